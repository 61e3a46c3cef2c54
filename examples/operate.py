"""Operating a run: a named run that is kept, looked at from a shell, and re-run for
only what failed.

    python examples/operate.py /tmp/runs            # shards 3 and 5 are corrupt: they fail
    batchpool status /tmp/runs/nightly              # which jobs failed, where, how long
    batchpool logs /tmp/runs/nightly 00000003       # what the failed job printed
    python examples/operate.py /tmp/runs --repair   # repair them: only shards 3 and 5 run
"""

import argparse
import time
from pathlib import Path

from batchpool import BatchPoolExecutor


def process(path: str) -> int:
    print(f"processing {Path(path).name}", flush=True)
    time.sleep(0.2)
    text = Path(path).read_text()
    if text.startswith("corrupt"):
        print(f"{Path(path).name}: checksum mismatch in block 17", flush=True)
        raise ValueError(f"{Path(path).name} is corrupt")
    return len(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("storage", help="a folder (or URL) that keeps the run")
    parser.add_argument("--repair", action="store_true", help="repair the corrupt shards")
    args = parser.parse_args()

    data = Path(args.storage, "shards")
    if not data.exists():  # the input: 8 shards, two of them corrupt
        data.mkdir(parents=True)
        for i in range(8):
            (data / f"shard-{i}.txt").write_text("corrupt" if i in (3, 5) else "x" * 100 * i)
    if args.repair:
        for shard in data.iterdir():
            if shard.read_text().startswith("corrupt"):
                shard.write_text("repaired")
    shards = sorted(str(p) for p in data.iterdir())

    with BatchPoolExecutor(
        name="nightly",
        resume=True,  # keep the run at <storage>/nightly; calls that returned are not re-run
        storage=args.storage,
        max_workers=2,
        cost_per_core_hour=0.05,
    ) as bpe:
        futures = [bpe.submit(process, shard) for shard in shards]
        for shard, future in zip(shards, futures, strict=True):
            error = future.exception()
            print(f"{Path(shard).name}: {future.result() if error is None else repr(error)}")
        print("calls by state:", bpe.status())
        print("usage:", bpe.usage())
        print("run:", bpe.run_url)


if __name__ == "__main__":
    main()
