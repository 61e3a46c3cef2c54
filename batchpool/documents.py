"""The JSON documents of a run, their schemas, and their signatures.

Everything in a run that a person, the CLI or a re-attaching client reads
without unpickling is one of these documents (``store.py`` says where each
lives): the manifest, the client's journal entries, the workers' start and end
markers, and a cancel request. Anyone who can write the store can write them, so
they are read as untrusted input:

- Each is decoded against its schema (msgspec ``Struct`` types: strict types,
  bounded numbers, chunk ids in their own format; unknown fields are ignored so
  newer writers stay readable). Anything else raises ``DocumentError`` naming
  the object and what is wrong with it, never a bare ``TypeError``.
- Each one batchpool writes, but the cancel request, carries ``mac``: an
  HMAC-SHA256 with the run secret over its key and its canonical JSON (sorted
  keys, no spaces, ASCII), so it cannot be moved to another key or another run.
  A reader that holds the secret refuses a document whose ``mac`` does not match;
  only a verified document may decide what runs, which process is signalled or
  which job is cancelled. Without the secret a document is only shown.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Annotated, Any, Final, Literal, TypeVar

import msgspec

#: The manifest's format marker: a folder is a batchpool run only if its manifest has it.
FORMAT: Final = "batchpool-run/2"

#: The largest document read, by kind (bytes); a bigger object is refused unread.
MAX_MANIFEST_BYTES = 256 << 20  # the job table of a run of millions of chunks
MAX_JOURNAL_BYTES = 64 << 20  # one hand-over of up to ~300,000 chunks
MAX_MARKER_BYTES = 1 << 20

ChunkId = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{8}-[0-9a-f]{12}\Z")]
Attempt = Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]
Count = Annotated[int, msgspec.Meta(ge=0, le=1 << 62)]
Pid = Annotated[int, msgspec.Meta(ge=1, le=(1 << 31) - 1)]
Seconds = Annotated[float, msgspec.Meta(ge=0)]
Text = Annotated[str, msgspec.Meta(max_length=100_000)]
#: An engine's job id as the journal records it; each backend checks its own format.
JobId = Annotated[str, msgspec.Meta(max_length=256)]
JobStateName = Literal["Pending", "Ready", "Running", "Success", "Failed", "Error", "Cancelled"]


class DocumentError(ValueError):
    """A document in a run's store is missing its signature, forged, or not in its schema."""

    def __init__(self, key: str, why: str) -> None:
        super().__init__(f"{key}: {why}")
        self.key = key
        self.why = why


# -- the documents ----------------------------------------------------------------------------


class Document(msgspec.Struct, kw_only=True):
    """A JSON document of a run; ``encode`` adds its ``mac``, ``decode`` checks it."""


class ClientInfo(Document, kw_only=True):
    """The client process that opened the run (the newest session's)."""

    python: Text = ""
    serializer: Text = ""
    serializer_version: Text = ""
    batchpool: Text = ""
    host: Text = ""
    pid: Pid | None = None
    pid_started: Seconds | None = None
    boot_id: Text | None = None


class BackendInfo(Document, kw_only=True):
    """Which engine ran the jobs, and the options ``make_backend(name, **options)``
    rebuilds it with (``Backend.describe``): never command paths or environment."""

    name: Text
    options: dict[str, Any] = {}


class Settings(Document, kw_only=True):
    """The executor's settings, so that ``attach`` continues the run as it was made."""

    cpus_per_job: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    image: Text | None = None
    project: Text | None = None
    max_workers: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] | None = None
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 3
    cleanup_bucket: bool = False
    serializer: Literal["cloudpickle", "dill"] = "cloudpickle"
    resume: bool = False
    cost_per_core_hour: Annotated[float, msgspec.Meta(ge=0)] | None = None
    #: GiB of memory per billed core (``billing.billed_cores``); None or 0: bill the CPUs.
    memory_per_core: Annotated[float, msgspec.Meta(ge=0)] | None = None
    #: Good citizenship on a shared cluster (README): culprit isolation, the canary of
    #: every map, the executor's failure budget (a count, or a fraction of calls ended).
    isolate_culprits: bool = True
    canary: Annotated[int, msgspec.Meta(ge=0)] = 0
    max_failures: Annotated[float, msgspec.Meta(ge=0)] | None = None
    job_options: dict[str, Any] = {}


class Session(Document, kw_only=True):
    opened: Text
    how: Literal["attach", "resume"]


class JobTableEntry(Document, kw_only=True):
    """A chunk's row of the job table the manifest gets when the run closes."""

    attempts: Attempt
    job_ids: list[JobId]
    calls: Count
    state: JobStateName


class Manifest(Document, kw_only=True):
    format: Literal["batchpool-run/2"]
    run_id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,200}\Z")]
    #: The name the run was given, exactly (its folder name may be a slug of it).
    name: Text | None = None
    created: Text
    client: ClientInfo
    backend: BackendInfo
    settings: Settings
    sessions: list[Session] = []
    jobs: dict[ChunkId, JobTableEntry] = {}


class Handed(Document, kw_only=True):
    """A chunk attempt the client handed to the engine, and the engine's job id for it."""

    chunk: ChunkId
    attempt: Attempt
    job_id: JobId
    calls: Count
    labels: list[Text] = []
    cpus: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    #: The cores the job is billed (``billing.billed_cores``); None in older runs: cpus.
    billed_cores: Annotated[float, msgspec.Meta(gt=0)] | None = None


class GivenUp(Document, kw_only=True):
    """A chunk the client gave up on: it got no result (Error), or was Cancelled."""

    chunk: ChunkId
    attempt: Attempt
    state: Literal["Error", "Cancelled"]
    reason: Text = ""
    #: Its job died and its calls run on split, in these chunks (culprits.py).
    split_into: list[ChunkId] = []


class JournalEntry(Document, kw_only=True):
    """One entry of the client's journal (``jobs/<seq>.json``)."""

    time: Seconds
    handed: list[Handed] = []
    given_up: list[GivenUp] = []
    #: The client shut down (cleanup_bucket=False): when, and what the run used.
    closed: Seconds | None = None
    usage: dict[str, Any] | None = None
    #: A later session (attach, resume=True) opened the run again.
    opened: Seconds | None = None
    #: Earlier failed jobs whose calls a resumed session submitted again.
    rerun: list[ChunkId] = []


class StartMarker(Document, kw_only=True):
    """A worker began an attempt of a chunk (``events/<chunk>.<attempt>.start``)."""

    chunk: ChunkId
    attempt: Attempt
    host: Text | None = None
    pid: Pid | None = None
    pid_started: Seconds | None = None
    boot_id: Text | None = None
    #: The digest of a local pool worker's token (see ``processes.py``).
    worker: Text | None = None
    started: Seconds | None = None
    engine_job: Text = ""
    restarts: Count = 0
    #: Set by a Dask task whose own code failed, so that a retry Dask makes runs again.
    failed: Text | None = None


class EndMarker(Document, kw_only=True):
    """A worker ended an attempt (``events/<chunk>.<attempt>.end``): times and usage."""

    chunk: ChunkId
    attempt: Attempt
    host: Text | None = None
    pid: Pid | None = None
    started: Seconds | None = None
    ended: Seconds | None = None
    wall_seconds: Seconds | None = None
    cpu_seconds: Seconds | None = None
    peak_memory_bytes: Count | None = None
    calls: Count | None = None
    failed: Count = 0
    errors: list[Text] = []
    #: The remote tracebacks of the first calls that raised (text, newest frame last).
    tracebacks: list[Text] = []
    #: The worker itself failed (not a call): why.
    error: Text | None = None
    #: Written by the client for a worker that died without writing it: the attempt ran
    #: from its start marker until the client learned it was lost (billed, as services
    #: bill preempted time).
    lost: bool = False


class CancelRequest(Document, kw_only=True):
    """``batchpool cancel`` asked the run to stop (``cancel.json``; not signed: the
    command may not hold the secret, and all it can do is stop the run)."""

    requested: Seconds
    by: Text = "?"


D = TypeVar("D", bound=Document)

_LIMITS: dict[type[Document], int] = {
    Manifest: MAX_MANIFEST_BYTES,
    JournalEntry: MAX_JOURNAL_BYTES,
    StartMarker: MAX_MARKER_BYTES,
    EndMarker: MAX_MARKER_BYTES,
    CancelRequest: MAX_MARKER_BYTES,
}


# -- signing ------------------------------------------------------------------------------------


def _canonical(raw: Mapping[str, Any]) -> bytes:
    return json.dumps(raw, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _mac(secret: bytes, key: str, raw: Mapping[str, Any]) -> str:
    mac = hmac.new(secret, b"batchpool-document\0" + key.encode() + b"\0", hashlib.sha256)
    mac.update(_canonical(raw))
    return mac.hexdigest()


def to_builtins(doc: Document | Mapping[str, Any]) -> dict[str, Any]:
    """A document as plain JSON data, exactly as a reader will decode it."""
    raw = msgspec.to_builtins(doc)
    # Through JSON and back, so the signed form is the one that is read (tuples become
    # lists, and so on).
    return dict(json.loads(json.dumps(raw, allow_nan=False)))


def encode(doc: Document, key: str, secret: bytes | None) -> bytes:
    """The bytes to store at ``key``: the document, signed with ``secret`` unless None."""
    raw = to_builtins(doc)
    raw.pop("mac", None)
    if secret is not None:
        raw["mac"] = _mac(secret, key, raw)
    return json.dumps(raw, indent=1, ensure_ascii=False, allow_nan=False).encode()


def decode(kind: type[D], key: str, data: bytes, secret: bytes | None = None) -> D:
    """The document at ``key``, checked against its schema and, when ``secret`` is given,
    against its signature; ``DocumentError`` saying what is wrong otherwise."""
    limit = _LIMITS.get(kind, MAX_MARKER_BYTES)
    if len(data) > limit:
        raise DocumentError(key, f"is {len(data):,} bytes, more than a {kind.__name__} can be")
    try:
        raw = msgspec.json.decode(data)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise DocumentError(key, f"is not JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise DocumentError(key, f"holds a JSON {type(raw).__name__}, not an object")
    mac = raw.pop("mac", None)
    if secret is not None:
        if not isinstance(mac, str):
            raise DocumentError(key, "carries no signature of this run, and was not used")
        if not hmac.compare_digest(mac, _mac(secret, key, raw)):
            raise DocumentError(
                key,
                "does not carry this run's signature: it was changed or written by someone "
                "without the run secret, and was not used",
            )
    try:
        return msgspec.convert(raw, kind)
    except (msgspec.ValidationError, RecursionError) as exc:
        raise DocumentError(key, f"is not a valid {kind.__name__}: {exc}") from None


def build(kind: type[D], fields: Mapping[str, Any]) -> D:
    """A document from plain data (nested documents as dicts), checked like one read."""
    try:
        return msgspec.convert(dict(fields), kind)
    except msgspec.ValidationError as exc:
        raise DocumentError(kind.__name__, f"not a valid {kind.__name__}: {exc}") from None


def replace(doc: D, **changes: Any) -> D:
    """A copy of ``doc`` with ``changes`` (plain data for nested documents)."""
    return build(type(doc), {**to_builtins(doc), **changes})


def describe_problem(exc: BaseException) -> str:
    """One line on why an object could not be read, for lists of a run's problems."""
    return str(exc) if isinstance(exc, (DocumentError, OSError)) else f"{type(exc).__name__}: {exc}"
