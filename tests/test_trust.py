"""Attacks by someone who can write a run's store but does not hold its secret.

Each test forges what such a writer can write (the manifest, the client's journal, the
workers' markers, logs, stray files), then uses the run through the public API or the
``batchpool`` command, and shows that the forgery changed nothing that matters: no
program ran, no process was signalled, no environment was chosen, nothing outside the
run was deleted, and the payload never ran. The threat model is in the README
("Security").
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fsspec.implementations.local import LocalFileSystem
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli import cli

from batchpool import BatchPoolError, BatchPoolExecutor, IntegrityError, StorageError
from batchpool import cli as batchpool_cli
from batchpool.backends.base import JobSpec, Resources
from batchpool.backends.sge import SGEBackend
from batchpool.backends.slurm import SlurmBackend
from batchpool.documents import (
    DocumentError,
    EndMarker,
    JournalEntry,
    Manifest,
    StartMarker,
    decode,
    encode,
)
from batchpool.processes import boot_id, process_started
from batchpool.recovery import load_secret
from batchpool.serialization import SECRET_ENV, seal
from batchpool.store import STORE_ENV, Store

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


# -- calls -----------------------------------------------------------------------------------------


def square(x: int) -> int:
    return x * x


def wait_for_gate(gate: str) -> str:
    deadline = time.monotonic() + 300
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.02)
    return "opened"


class Payload:
    """What an attacker's pickle does when it is loaded: leave a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.path}",))


# -- helpers ---------------------------------------------------------------------------------------


def cli_here(*args: str) -> tuple[int, str, str]:
    """The command run in this process (fast, for many malformed inputs): its exit code,
    stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = batchpool_cli.main(list(args))
    return code, out.getvalue(), err.getvalue()


def without_secret(tmp_path: Path) -> dict[str, str]:
    """An environment in which the run's secret is not found (another machine)."""
    env = {k: v for k, v in os.environ.items() if k != SECRET_ENV}
    env["XDG_DATA_HOME"] = str(tmp_path / "another-machine")
    return env


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def write_json(path: Path, document: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))


def pool_workers() -> list[int]:
    """The local pool workers that are children of this process."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat_line = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat_line.rsplit(")", 1)[1].split()[1])
        if ppid == os.getpid() and b"batchpool.worker" in cmdline:
            found.append(int(entry))
    return found


def live_processes() -> Iterator[tuple[int, list[str]]]:
    """Each live (not zombie) process: its pid, and the fields of its /proc stat line
    after the command name (state, ppid, pgrp, session, ...)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if fields[0] not in ("Z", "X"):
            yield int(entry), fields


def running_here() -> set[str]:
    """This process's live threads and child processes: what could still act later."""
    live = {f"thread {thread.ident}" for thread in threading.enumerate()}
    me = os.getpid()
    return live | {f"process {pid}" for pid, fields in live_processes() if int(fields[1]) == me}


def session_processes(sid: int) -> list[int]:
    """The live processes of session ``sid``."""
    return [pid for pid, fields in live_processes() if int(fields[3]) == sid]


def cli_to_the_end(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``cli``, in a session of its own, which has no process left when this returns:
    whatever the command started has ended too, and done all it will do."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchpool", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    stdout, stderr = proc.communicate(timeout=60)
    deadline = time.monotonic() + 60
    while session_processes(proc.pid):
        assert time.monotonic() < deadline, f"batchpool {args[0]} left processes running"
        time.sleep(0.01)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def finished_run(storage: Path, name: str = "done") -> Path:
    with BatchPoolExecutor(
        name=name, storage=str(storage), cleanup_bucket=False, max_workers=1
    ) as bpe:
        assert bpe.submit(square, 3).result(timeout=60) == 9
        return Path(bpe.run_url)


DEAD_CLIENT = """
import sys, time
sys.path.insert(0, {tests!r})
from batchpool import BatchPoolExecutor
from test_trust import square, wait_for_gate

bpe = BatchPoolExecutor(name="dead", storage=sys.argv[1], cleanup_bucket=False, max_workers=1)
bpe.submit(wait_for_gate, sys.argv[2])
for i in range(3):
    bpe.submit(square, i)
print(bpe.run_url, flush=True)
time.sleep(600)
"""


@dataclass
class DeadRun:
    """A run whose client was SIGKILLed while its first job ran (blocked on a gate)."""

    storage: Path
    url: Path
    gate: Path
    first_chunk: str
    worker_pid: int

    def start_marker(self) -> Path:
        return self.url / "events" / f"{self.first_chunk}.1.start"


def start_dead_run(tmp_path: Path, *, kill_worker: bool) -> DeadRun:
    storage, gate = tmp_path / "runs", tmp_path / "gate"
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent(DEAD_CLIENT.format(tests=str(TESTS))))
    client = subprocess.Popen(
        [sys.executable, str(script), str(storage), str(gate)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert client.stdout is not None
        url = Path(client.stdout.readline().strip())
        deadline = time.monotonic() + 60
        while True:
            starts = sorted((url / "events").glob("*.1.start")) if url.name else []
            if starts:
                break
            assert time.monotonic() < deadline, "the dead client's first job never started"
            time.sleep(0.02)
    finally:
        client.send_signal(signal.SIGKILL)
        client.wait()
    marker = read_json(starts[0])
    if kill_worker:
        os.kill(marker["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 60  # a hang guard: SIGKILL ends it at once
        while process_started(marker["pid"]) is not None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    return DeadRun(storage, url, gate, marker["chunk"], marker["pid"])


@pytest.fixture
def dead_run(tmp_path: Path) -> Iterator[DeadRun]:
    run = start_dead_run(tmp_path, kill_worker=True)
    yield run
    run.gate.touch()


VICTIM = """
import os, signal, sys, time
ack, probes = sys.argv[1], [0]
def probed(signum, frame):
    probes[0] += 1
    with open(ack + ".tmp", "w") as f:
        f.write(str(probes[0]))
    os.replace(ack + ".tmp", ack)
signal.signal(signal.SIGRTMIN, probed)
print("ready", flush=True)
while True:
    time.sleep(3600)
"""


class Victim:
    """A process of this user that no batchpool command may signal. It lives until the
    test ends, and answers a probe signal: see ``unsignalled``."""

    def __init__(self, folder: Path) -> None:
        self.ack = folder / "victim-ack"
        self.probes = 0
        self.proc = subprocess.Popen(
            [sys.executable, "-c", VICTIM, str(self.ack)], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "ready\n"
        self.pid = self.proc.pid

    def unsignalled(self) -> bool:
        """Whether no signal reached the victim before now. Linux delivers a pending
        standard signal (SIGTERM, SIGKILL, ...) before a real-time one: the victim answers
        this probe only if no such signal was sent it earlier, and dies first if one was."""
        self.probes += 1
        os.kill(self.pid, signal.SIGRTMIN)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                return False
            if self.ack.exists() and self.ack.read_text() == str(self.probes):
                return True
            assert time.monotonic() < deadline, "the victim neither answered nor died"
            time.sleep(0.01)


@pytest.fixture
def victim(tmp_path: Path) -> Iterator[Victim]:
    victim = Victim(tmp_path)
    yield victim
    victim.proc.kill()
    victim.proc.wait()


def victim_marker(run: DeadRun, victim: Victim) -> dict[str, Any]:
    """A start marker for the dead run's first chunk that names ``victim``, with all that
    anyone on the host can read of it."""
    return {
        "chunk": run.first_chunk,
        "attempt": 1,
        "host": os.uname()[1],
        "pid": victim.pid,
        "pid_started": process_started(victim.pid),
        "boot_id": boot_id(),
        "worker": "0" * 32,
        "started": time.time(),
    }


def sign(run_url: Path, key: str, document: dict[str, Any], kind: type[Any]) -> None:
    """Write a document signed with the run's own secret, as a batchpool worker would:
    what a process that holds the secret can write (a forger cannot)."""
    from batchpool.documents import build

    secret = load_secret(str(run_url))
    (run_url / key).write_bytes(encode(build(kind, document), key, secret))


# -- a forged manifest -----------------------------------------------------------------------------


def forge_attack_manifest(run_url: Path, tmp_path: Path) -> dict[str, Path]:
    """The manifest attack of the issue: job options whose env names another store and a
    secret the attacker chose (holding a pickle signed with it), bash setup lines,
    24 workers, and a Slurm backend whose commands and PATH are the attacker's."""
    pwned = {name: tmp_path / f"pwned-{name}" for name in ("pickle", "setup", "command", "path")}
    attacker_root = tmp_path / "attacker-store"
    attacker = Store(LocalFileSystem(), str(attacker_root))
    attacker.create()
    attacker_secret = b"\x01" * 32
    bin_dir = run_url / "logs" / "bin"
    bin_dir.mkdir(parents=True)
    for command in ("squeue", "sacct", "sinfo", "scancel", "scontrol"):
        script = bin_dir / command
        script.write_text(f"#!/bin/sh\ntouch {pwned['path']}\n")
        script.chmod(0o755)
    manifest = read_json(run_url / "manifest.json")
    settings = manifest["settings"]
    settings["max_workers"] = 24
    options = settings["job_options"]
    options["env"] = [
        [STORE_ENV, attacker.spec()],
        [SECRET_ENV, attacker_secret.hex()],
        ["PATH", str(bin_dir)],
    ]
    options["setup"] = [f"touch {pwned['setup']}"]
    manifest["backend"] = {
        "name": "slurm",
        "options": {"scancel": "/usr/bin/touch", "squeue": str(bin_dir / "squeue")},
        "environment": {"PATH": str(bin_dir)},
    }
    write_json(run_url / "manifest.json", manifest)  # its old signature no longer matches
    for chunk in (run_url / "chunks").iterdir():  # the attacker's calls, signed for its store
        key = f"chunks/{chunk.name}"
        attacker.put(key, seal(attacker_secret, key, b"not even a chunk"))
    # and a journal entry whose job id is a path for `scancel=/usr/bin/touch`
    write_json(
        run_url / "jobs" / "00000090.json",
        {
            "time": time.time(),
            "handed": [
                {
                    "chunk": next((run_url / "chunks").iterdir()).name.removesuffix(".in"),
                    "attempt": 1,
                    "job_id": str(pwned["command"]),
                    "calls": 1,
                }
            ],
        },
    )
    return pwned


def test_attach_refuses_a_manifest_the_run_did_not_sign(dead_run: DeadRun, tmp_path: Path) -> None:
    pwned = forge_attack_manifest(dead_run.url, tmp_path)
    before, running = pool_workers(), running_here()
    with pytest.raises(IntegrityError, match="does not carry this run's signature"):
        BatchPoolExecutor.attach(str(dead_run.storage), dead_run.url.name)
    # No thread or process the attach started still runs: anything it started is done.
    assert running_here() <= running
    assert [path for path in pwned.values() if path.exists()] == []
    assert pool_workers() == before  # not 24 workers, not one


def test_attach_refuses_a_manifest_without_a_signature(dead_run: DeadRun) -> None:
    manifest = read_json(dead_run.url / "manifest.json")
    del manifest["mac"]
    manifest["settings"]["max_workers"] = 24
    write_json(dead_run.url / "manifest.json", manifest)
    with pytest.raises(IntegrityError, match="carries no signature"):
        BatchPoolExecutor.attach(str(dead_run.storage), dead_run.url.name)


def test_the_command_runs_no_program_the_store_names(dead_run: DeadRun, tmp_path: Path) -> None:
    pwned = forge_attack_manifest(dead_run.url, tmp_path)
    for env in (None, without_secret(tmp_path)):
        for command in ("status", "cancel"):
            result = cli_to_the_end(command, str(dead_run.url), env=env)
            assert "Traceback" not in result.stderr, result.stderr
        result = cli_to_the_end("clean", str(dead_run.url), "--dry-run", env=env)
        assert "Traceback" not in result.stderr, result.stderr
    # Every process of the commands has ended: what they ran has left its file.
    assert [path for path in pwned.values() if path.exists()] == []


def test_a_job_environment_never_loses_the_store_and_the_secret() -> None:
    with pytest.raises(ValueError, match="BATCHPOOL_"):
        Resources().replace(env={STORE_ENV: "elsewhere"})
    with pytest.raises(ValueError, match="not an environment variable name"):
        Resources().replace(env={"A=B": "x"})
    # Even resources made without that check cannot override them.
    forged = Resources(env=((STORE_ENV, "elsewhere"), (SECRET_ENV, "00"), ("OTHER", "kept")))
    spec = JobSpec("job", (), env={STORE_ENV: "ours", SECRET_ENV: "ff"}, resources=forged)
    assert spec.environment() == {STORE_ENV: "ours", SECRET_ENV: "ff", "OTHER": "kept"}


def test_job_ids_reach_no_engine_command_unless_they_are_the_engines_own(tmp_path: Path) -> None:
    """``--user=alice`` would make ``scancel`` cancel every job of alice."""
    ran = tmp_path / "ran"
    script = tmp_path / "engine-command"
    script.write_text(f'#!/bin/sh\necho "$@" >> {ran}\n')
    script.chmod(0o755)
    slurm = SlurmBackend(scancel=str(script), squeue=str(script), log_dir=tmp_path)
    sge = SGEBackend(qdel=str(script), qstat=str(script), log_dir=str(tmp_path))
    for bad in ("--user=alice", "-u alice", "12_3\n", "12_3 --me", "١٢_٣", "", "12.3.4"):
        with pytest.raises(ValueError):
            slurm.cancel([bad])
        with pytest.raises(ValueError):
            slurm.status([bad])
        with pytest.raises(ValueError):
            sge.cancel([bad])
        with pytest.raises(ValueError):
            SGEBackend.check_job_id(bad)
    assert not ran.exists()
    slurm.cancel(["12_3"])  # the engine's own form passes
    sge.cancel(["12.3"])
    assert ran.read_text().split("\n")[:2] == ["12_3", "12 -t 3"]


# -- forged markers: signals and waits -------------------------------------------------------------


def test_cancel_signals_no_process_a_forged_marker_names(
    dead_run: DeadRun, victim: Victim, tmp_path: Path
) -> None:
    write_json(dead_run.start_marker(), victim_marker(dead_run, victim))  # unsigned
    for env in (None, without_secret(tmp_path)):
        result = cli_to_the_end("cancel", str(dead_run.url), env=env)
        assert result.returncode in (0, 1), result.stderr
        assert "sent SIGTERM" not in result.stdout
        assert victim.unsignalled(), "the victim was signalled"
    # Even a marker signed with the run's secret (a real worker's, whose pid was reused
    # by another process since) does not make a process a batchpool worker.
    key = f"events/{dead_run.first_chunk}.1.start"
    sign(dead_run.url, key, victim_marker(dead_run, victim), StartMarker)
    result = cli_to_the_end("cancel", str(dead_run.url))
    assert "is not the batchpool worker that started it" in result.stdout, result.stdout
    assert victim.unsignalled(), "the victim was signalled"


def test_attach_does_not_wait_on_a_process_a_marker_names(
    dead_run: DeadRun, victim: Victim
) -> None:
    key = f"events/{dead_run.first_chunk}.1.start"
    sign(dead_run.url, key, victim_marker(dead_run, victim), StartMarker)
    dead_run.gate.touch()
    with BatchPoolExecutor.attach(str(dead_run.storage), dead_run.url.name) as bpe:
        # The victim lives on until the test ends: waited on, no result would come.
        results = [f.result(timeout=60) for f in bpe.futures]
    assert results == ["opened", 0, 1, 4]
    assert victim.unsignalled()


def test_attach_waits_for_a_real_orphan_only_until_its_grace_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = start_dead_run(tmp_path, kill_worker=False)  # the worker lives, blocked on the gate
    try:
        monkeypatch.setenv("BATCHPOOL_ORPHAN_GRACE", "2")
        started = time.monotonic()
        with BatchPoolExecutor.attach(str(run.storage), run.url.name) as bpe:
            # The orphan is provably ours: killed when its grace ends, then run again.
            deadline = time.monotonic() + 60  # a hang guard: it was waited on forever
            while process_started(run.worker_pid) is not None:
                assert time.monotonic() < deadline, "the orphan was waited on past its grace"
                time.sleep(0.05)
            waited = time.monotonic() - started
            run.gate.touch()
            assert [f.result(timeout=60) for f in bpe.futures] == ["opened", 0, 1, 4]
            first = bpe.futures[0]
            # Run again split (the chunk's four calls in two pieces), its log kept.
            assert first.job is not None and first.job.split_from is not None
            assert "its worker was still running it when its grace ran out" in first.logs()
        # Not killed before its grace: the attach set the 2 s deadline after `started`,
        # so this holds however slow the machine (a lower bound only; no upper one).
        assert waited >= 2.0
    finally:
        run.gate.touch()
        if process_started(run.worker_pid) is not None:
            os.kill(run.worker_pid, signal.SIGKILL)


# -- clean deletes only batchpool runs -------------------------------------------------------------


def test_clean_leaves_folders_that_are_not_runs_alone(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    run = finished_run(storage, "mine")
    webapp = storage / "webapp"
    write_json(webapp / "manifest.json", {"name": "webapp", "created": "2020-01-01T00:00:00"})
    (webapp / "index.html").write_text("<h1>keep me</h1>")
    # A run's own format and layout, with something else in it.
    lookalike = storage / "lookalike"
    lookalike.mkdir()
    (lookalike / "manifest.json").write_text((run / "manifest.json").read_text())
    (lookalike / "notes.txt").write_text("mine")
    # A link to a run, and a manifest that names another folder.
    (storage / "link").symlink_to(run)
    result = cli("clean", str(storage), "--older-than", "0s")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"deleted {run} (" in result.stdout
    assert (webapp / "index.html").exists() and (lookalike / "notes.txt").exists()
    assert (storage / "link").is_symlink() and f"deleted {storage / 'link'}" not in result.stdout
    for folder in ("webapp", "lookalike"):
        assert f"left alone {storage / folder}: it is not a batchpool run" in result.stdout


def test_clean_refuses_a_project_folder_with_its_own_manifest(tmp_path: Path) -> None:
    project = tmp_path / "my-project"
    write_json(project / "manifest.json", {"name": "my-project", "created": "2020-01-01"})
    (project / "src.py").write_text("print('precious')")
    result = cli("clean", str(project))
    assert result.returncode == 2
    assert "is not a batchpool run" in result.stderr and "Traceback" not in result.stderr
    assert (project / "src.py").exists()


def test_clean_and_cancel_need_the_whole_name(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    run = finished_run(storage, "mine")
    for command in ("clean", "cancel"):
        result = cli(command, str(storage / "m"))
        assert result.returncode == 2, result.stdout
        assert f"only the start of the id of 1 run ({run.name})" in result.stderr
    assert run.exists()
    # A command that only reads takes a unique prefix, and says so.
    result = cli("status", str(storage / "m"))
    assert result.returncode == 0, result.stderr
    assert f"'m' taken as the start of the id of run {run.name}" in result.stderr
    # The name the run was given, exactly, is enough.
    result = cli("clean", str(storage / "mine"))
    assert result.returncode == 0, result.stderr
    assert not run.exists()


# -- malformed documents ---------------------------------------------------------------------------


BAD_JSON: dict[str, bytes] = {
    "not json": b"{this is not json",
    "a string": b'"just a string"',
    "a list": b"[1, 2, 3]",
    "deep": b"[" * 100_000 + b"]" * 100_000,
    "wrong types": b'{"chunk": 1, "attempt": "one", "time": "now", "format": 2}',
    "huge number": b'{"attempt": 1' + b"0" * 5000 + b', "time": 1e999}',
    "null": b"null",
    "truncated": b'{"chunk": "00000000-0123456789ab", "att',
    "too big": b'{"host": "' + b"x" * (2 << 20) + b'"}',
    "binary": bytes(range(256)),
}


def corrupt(run: Path, which: str, data: bytes) -> None:
    chunk = sorted((run / "chunks").iterdir())[0].name.removesuffix(".in")
    paths = {
        "manifest": run / "manifest.json",
        "journal": sorted((run / "jobs").iterdir())[0],
        "start": run / "events" / f"{chunk}.1.start",
        "end": run / "events" / f"{chunk}.1.end",
        "cancel": run / "cancel.json",
    }
    paths[which].write_bytes(data)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    storage = tmp_path_factory.mktemp("pristine")
    finished_run(storage, "good")
    finished_run(storage, "bad")
    return storage


@pytest.mark.parametrize("which", ["manifest", "journal", "start", "end", "cancel"])
def test_malformed_documents_never_crash_the_command(
    pristine: Path, tmp_path: Path, which: str
) -> None:
    import shutil

    for how, data in BAD_JSON.items():
        storage = tmp_path / how.replace(" ", "-")
        shutil.copytree(pristine, storage, symlinks=True)
        good, bad = sorted(storage.iterdir())[1], sorted(storage.iterdir())[0]
        assert good.name.startswith("good") and bad.name.startswith("bad")
        corrupt(bad, which, data)
        for args in (
            ["runs", str(storage)],
            ["runs", str(storage), "--json"],
            ["status", str(bad)],
            ["status", str(bad), "--json"],
            ["logs", str(bad)],
            ["clean", str(storage), "--older-than", "100w", "--dry-run"],
        ):
            code, out, err = cli_here(*args)
            context = f"{which}={how}: batchpool {' '.join(args[:1])}: {code} {err[-500:]}"
            assert code in (0, 1), context
            assert "Traceback" not in err and "failed:" not in err, context
            if args[0] == "runs":
                assert good.name in out, context  # the other run is still listed
        code, out, err = cli_here("status", str(bad))
        assert code == 1 and "problem" in out, f"{which}={how}: {out}"


@pytest.mark.parametrize("which", ["journal", "start", "end", "cancel", "stray"])
def test_attach_skips_what_it_cannot_read(tmp_path: Path, which: str) -> None:
    run = finished_run(tmp_path, "damaged")
    if which == "stray":
        (run / "chunks" / "notes.txt").write_text("a person's notes")
        (run / "results" / "garbage").write_bytes(b"\x00")
    else:
        corrupt(run, which, BAD_JSON["wrong types"])
    with BatchPoolExecutor.attach(str(tmp_path), run.name) as bpe:
        assert [f.result(timeout=60) for f in bpe.futures] == [9]


def test_attach_explains_a_damaged_manifest(tmp_path: Path) -> None:
    run = finished_run(tmp_path, "damaged")
    for data in BAD_JSON.values():
        corrupt(run, "manifest", data)
        with pytest.raises(BatchPoolError, match="cannot reopen the run") as caught:
            BatchPoolExecutor.attach(str(tmp_path), run.name)
        assert "manifest.json" in str(caught.value)


# -- text from the store on a terminal -------------------------------------------------------------


ESCAPES = "\x1b]0;owned\x07\x1b[2J\x1b[31mred\u202etxt.exe\r"


def test_store_text_is_escaped_on_a_terminal(tmp_path: Path) -> None:
    import pty

    run = finished_run(tmp_path, "loud")
    chunk = sorted((run / "chunks").iterdir())[0].name.removesuffix(".in")
    (run / "logs" / f"{chunk}.1.log").write_text(f"printed {ESCAPES}\nnext line\n")
    end = read_json(run / "events" / f"{chunk}.1.end")
    end["error"] = f"boom {ESCAPES}"
    write_json(run / "events" / f"{chunk}.1.end", end)  # shown only without the secret
    env = without_secret(tmp_path)

    def on_terminal(*args: str) -> bytes:
        leader, follower = pty.openpty()
        proc = subprocess.Popen(
            [sys.executable, "-m", "batchpool", *args],
            cwd=REPO,
            stdin=follower,
            stdout=follower,
            stderr=follower,
            env=env,
        )
        os.close(follower)
        output = b""
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:
                break
            if not data:
                break
            output += data
        proc.wait(timeout=60)
        os.close(leader)
        return output

    for args in (("logs", str(run)), ("status", str(run))):
        shown = on_terminal(*args)
        assert b"\x1b" not in shown and b"\x07" not in shown, shown
        assert "\u202e".encode() not in shown
        assert b"\\x1b" in shown
    # To a file or a pipe, a log is the job's own bytes.
    piped = cli("logs", str(run), env=env)
    assert ESCAPES.replace("\r", "") in piped.stdout.replace("\r", "")


# -- resume: exact names, one creator, private secrets ---------------------------------------------


def test_resume_names_keep_their_identity(tmp_path: Path) -> None:
    names = ["データ", "模型", "a/b", "a b", "exp 1", "exp?1", "exp-1", "run", ""]
    urls = {}
    for i, name in enumerate(names):
        if not name:
            continue
        with BatchPoolExecutor(name=name, resume=True, storage=str(tmp_path)) as bpe:
            assert bpe.submit(square, i).result(timeout=60) == i * i
            urls[name] = bpe.run_url
    assert len(set(urls.values())) == len(urls), urls  # no two names share a run
    assert urls["exp-1"].endswith("/exp-1") and urls["run"].endswith("/run")
    for i, name in enumerate(names):
        if not name:
            continue
        with BatchPoolExecutor(name=name, resume=True, storage=str(tmp_path)) as bpe:
            assert bpe.run_url == urls[name]
            again = bpe.submit(square, i)
            assert again.result(timeout=60) == i * i and again.job is None  # not run again


def test_a_folder_that_holds_another_names_run_is_refused(tmp_path: Path) -> None:
    with BatchPoolExecutor(name="exp 1", resume=True, storage=str(tmp_path)) as bpe:
        folder = Path(bpe.run_url).name
    assert folder.startswith("exp-1-")
    with pytest.raises(BatchPoolError, match="holds the run named 'exp 1'"):
        BatchPoolExecutor(name=folder, resume=True, storage=str(tmp_path))


def test_sessions_that_resume_at_the_same_moment_create_one_run(tmp_path: Path) -> None:
    import threading

    from batchpool.runs import open_run, read_run

    def session(name: str, i: int, barrier: threading.Barrier, results: dict[int, Any]) -> None:
        barrier.wait()
        try:
            with BatchPoolExecutor(name=name, resume=True, storage=str(tmp_path)) as bpe:
                results[i] = (bpe.run_url, bpe.submit(square, i).result(timeout=60))
        except BaseException as exc:  # every outcome is counted
            results[i] = exc

    for trial in range(3):
        name = f"race-{trial}"
        barrier = threading.Barrier(6)
        results: dict[int, Any] = {}
        threads = [
            threading.Thread(target=session, args=(name, i, barrier, results)) for i in range(6)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=90)
        # One created the run; the others, a moment later, continued it: one run, one
        # secret, every session's call done.
        assert len({url for url, _ in results.values()}) == 1, results
        assert {i: value for i, (_, value) in results.items()} == {i: i * i for i in range(6)}
        [url] = {url for url, _ in results.values()}
        view = read_run(open_run(url), load_secret(url))
        assert view.problems == [] and view.manifest is not None
        # The journal lost no entry to the race: each session that continued the run
        # says so, and each of the 6 calls was handed over.
        entries = [read_json(path) for path in sorted(Path(url, "jobs").iterdir())]
        assert sum(entry.get("opened") is not None for entry in entries) == 5
        assert sum(len(entry.get("handed") or []) for entry in entries) == 6
        with BatchPoolExecutor(name=name, resume=True, storage=str(tmp_path)) as again:
            reused = again.submit(square, 4)
            assert reused.result(timeout=60) == 16 and reused.job is None  # not run again


RACER = """
import os, sys, time
sys.path.insert(0, {tests!r})
from batchpool import BatchPoolExecutor
from test_trust import square
barrier = sys.argv[2]
open(os.path.join(barrier, "ready-" + sys.argv[3]), "w").close()
while not os.path.exists(os.path.join(barrier, "go")):
    time.sleep(0.001)
with BatchPoolExecutor(name="racers", resume=True, storage=sys.argv[1]) as bpe:
    print(bpe.run_url, bpe.submit(square, int(sys.argv[3])).result(timeout=60), flush=True)
"""


def test_processes_that_resume_at_the_same_moment_create_one_run(tmp_path: Path) -> None:
    script = tmp_path / "racer.py"
    script.write_text(textwrap.dedent(RACER.format(tests=str(TESTS))))
    barrier = tmp_path / "barrier"  # all start their session at once, after importing
    barrier.mkdir()
    racers = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "runs"), str(barrier), str(i)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    deadline = time.monotonic() + 60
    while len(list(barrier.glob("ready-*"))) < 3:
        assert time.monotonic() < deadline, "the racers never got ready"
        assert all(racer.poll() is None for racer in racers), "a racer died"
        time.sleep(0.01)
    (barrier / "go").touch()
    outputs = [racer.communicate(timeout=90)[0].split() for racer in racers]
    assert len({url for url, _ in outputs}) == 1, outputs
    assert [int(value) for _, value in outputs] == [0, 1, 4]
    with BatchPoolExecutor(name="racers", resume=True, storage=str(tmp_path / "runs")) as bpe:
        assert bpe.submit(square, 2).result(timeout=60) == 4


def test_secret_files_must_be_private_and_this_users(tmp_path: Path) -> None:
    from batchpool.recovery import secret_file

    run = finished_run(tmp_path, "private")
    path = secret_file(str(run))
    assert path.stat().st_mode & 0o777 == 0o600
    for change in ("world-readable", "another owner", "a link"):
        saved = path.read_bytes()
        if change == "world-readable":
            path.chmod(0o644)
        elif change == "another owner":
            os.chown(path, 65534, 65534)
        else:
            path.unlink()
            (tmp_path / "elsewhere").write_bytes(saved)
            path.symlink_to(tmp_path / "elsewhere")
        with pytest.raises(BatchPoolError, match=r"secret file .* (not private|cannot be read)"):
            BatchPoolExecutor.attach(str(tmp_path), run.name)
        result = cli("status", str(run))
        assert result.returncode == 2 and "secret file" in result.stderr, result.stderr
        path.unlink()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, saved)
        os.close(fd)
    with BatchPoolExecutor.attach(str(tmp_path), run.name) as bpe:
        assert [f.result(timeout=60) for f in bpe.futures] == [9]


def test_a_new_run_never_writes_its_secret_into_a_file_left_there(tmp_path: Path) -> None:
    from batchpool.recovery import secret_file

    with BatchPoolExecutor(name="again", resume=True, storage=str(tmp_path)) as bpe:
        url = bpe.run_url
    path = secret_file(url)
    import shutil

    shutil.rmtree(url)  # deleted by hand: its secret file stays
    path.chmod(0o644)
    stale = path.read_text()
    with BatchPoolExecutor(name="again", resume=True, storage=str(tmp_path)) as bpe:
        assert bpe.submit(square, 5).result(timeout=60) == 25
    assert path.stat().st_mode & 0o777 == 0o600 and path.read_text() != stale
    # A link planted where the secret goes is replaced, not written through.
    shutil.rmtree(url)
    target = tmp_path / "target"
    target.write_text("someone else's file")
    path.unlink()
    path.symlink_to(target)
    with BatchPoolExecutor(name="again", resume=True, storage=str(tmp_path)) as bpe:
        assert bpe.submit(square, 6).result(timeout=60) == 36
    assert target.read_text() == "someone else's file" and not path.is_symlink()


def test_attach_by_name_passes_over_folders_that_only_claim_the_name(tmp_path: Path) -> None:
    import shutil

    run = finished_run(tmp_path, "nightly")
    # Newer by its folder's name, and a byte-for-byte copy of the run, signatures and all.
    clone = tmp_path / "nightly-99991231-235959-00000000"
    shutil.copytree(run, clone)
    assert load_secret(str(run)) and (clone / "manifest.json").exists()
    with BatchPoolExecutor.attach(str(tmp_path), "nightly") as bpe:
        assert bpe.run_url == str(run)
        assert [f.result(timeout=60) for f in bpe.futures] == [9]
    # Even with the run's secret given, a copy is not taken for the run.
    with pytest.raises(IntegrityError, match="reopened only in its own folder"):
        BatchPoolExecutor.attach(str(tmp_path), clone.name, secret=load_secret(str(run)))


# -- links in a local store -----------------------------------------------------------------------


def swap_folder_for_a_link(run_url: str, folder: str, target: str) -> int:
    """What a writer of the storage folder can do while a job runs."""
    os.rename(os.path.join(run_url, folder), target)
    os.symlink(target, os.path.join(run_url, folder))
    return 1


def test_no_object_is_written_or_read_through_a_link(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    with BatchPoolExecutor(storage=str(tmp_path / "runs"), max_workers=1) as bpe:
        future = bpe.submit(swap_folder_for_a_link, bpe.run_url, "results", str(elsewhere))
        with pytest.raises(StorageError, match="is a symbolic link"):
            future.result(timeout=60)
        assert future.job is not None and future.job.attempt == 1  # not run again
    assert list(elsewhere.iterdir()) == []  # nothing was written through the link
    run = finished_run(tmp_path / "more", "linked")
    private = tmp_path / "private.txt"
    private.write_text("the user's private notes")
    chunk = sorted((run / "chunks").iterdir())[0].name.removesuffix(".in")
    (run / "logs" / f"{chunk}.1.log").symlink_to(private)
    for args in (("logs", str(run)), ("logs", str(run), chunk)):
        result = cli(*args)
        assert "Traceback" not in result.stderr
        assert "private notes" not in result.stdout + result.stderr


STRUCTURAL = ("manifest-fifo", "manifest-dir", "cancel-fifo", "marker-fifo", "events-file", "link")


def forge_structure(run: Path, how: str) -> None:
    chunk = sorted((run / "chunks").iterdir())[0].name.removesuffix(".in")
    if how == "manifest-fifo":
        (run / "manifest.json").unlink()
        os.mkfifo(run / "manifest.json")  # a reader that opens it waits for a writer forever
    elif how == "manifest-dir":
        (run / "manifest.json").unlink()
        (run / "manifest.json").mkdir()
    elif how == "cancel-fifo":
        os.mkfifo(run / "cancel.json")
    elif how == "marker-fifo":
        (run / "events" / f"{chunk}.1.start").unlink()
        os.mkfifo(run / "events" / f"{chunk}.1.start")
    elif how == "events-file":
        import shutil

        shutil.rmtree(run / "events")
        (run / "events").write_text("not a folder")
    else:
        target = run.parent / "moved-away"
        os.rename(run, target)
        os.symlink(target, run)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", STRUCTURAL)
def test_pipes_folders_and_links_where_documents_belong(tmp_path: Path, how: str) -> None:
    storage = tmp_path / "storage"
    finished_run(storage, "good")
    bad = finished_run(storage, "bad")
    forge_structure(bad, how)
    for args in (
        ["runs", str(storage)],
        ["status", str(bad)],
        ["logs", str(bad)],
        ["clean", str(storage), "--older-than", "100w", "--dry-run"],
    ):
        code, _, err = cli_here(*args)
        assert code in (0, 1), f"{how}: {args[0]}: {code} {err}"
        assert "Traceback" not in err and "failed:" not in err, f"{how}: {args[0]}: {err}"
    code, _, err = cli_here("clean", str(bad))
    if how == "marker-fifo":  # still a run's layout: only a marker is odd
        assert code == 0, err
    else:
        assert code == 2 and "not a batchpool run" in err, err
        assert os.path.lexists(bad)


# -- the documents, as properties -----------------------------------------------------------------

_text = st.text(max_size=40)
_markers = st.builds(
    StartMarker,
    chunk=st.from_regex(r"[0-9]{8}-[0-9a-f]{12}", fullmatch=True),
    attempt=st.integers(1, 1000),
    host=st.none() | _text,
    pid=st.none() | st.integers(1, 2**31 - 1),
    pid_started=st.none() | st.floats(0, 1e12),
    boot_id=st.none() | _text,
    worker=st.none() | _text,
    started=st.none() | st.floats(0, 1e12),
    engine_job=_text,
    restarts=st.integers(0, 100),
)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(marker=_markers, secret=st.binary(min_size=32, max_size=32), flip=st.integers(0, 10**6))
def test_signed_documents_round_trip_and_any_change_is_refused(
    marker: StartMarker, secret: bytes, flip: int
) -> None:
    key = f"events/{marker.chunk}.{marker.attempt}.start"
    data = encode(marker, key, secret)
    assert decode(StartMarker, key, data, secret) == marker
    assert decode(StartMarker, key, data) == marker  # without the secret: read, unchecked
    with pytest.raises(DocumentError):
        decode(StartMarker, f"events/{marker.chunk}.{marker.attempt + 1}.start", data, secret)
    with pytest.raises(DocumentError):
        decode(StartMarker, key, data, bytes(32) if secret != bytes(32) else b"\x01" * 32)
    changed = bytearray(data)
    changed[flip % len(changed)] ^= 0x01
    try:
        assert decode(StartMarker, key, bytes(changed), secret) == marker  # whitespace only
    except DocumentError:
        pass


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200) | _json.map(lambda v: json.dumps(v).encode()))
def test_reading_any_bytes_as_a_document_raises_nothing_but_document_error(data: bytes) -> None:
    for kind in (Manifest, JournalEntry, StartMarker, EndMarker):
        for secret in (None, b"\x02" * 32):
            try:
                decode(kind, "events/x.1.start", data, secret)
            except DocumentError:
                pass
