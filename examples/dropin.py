"""A ProcessPoolExecutor script, with one line changed: the import.

Run it: python examples/dropin.py
"""

import multiprocessing
import os
from concurrent.futures.process import BrokenProcessPool

from batchpool import BatchPoolExecutor as ProcessPoolExecutor

model = {}


def load_model(scale):  # the initializer: runs once in each worker process
    model["scale"] = scale


def score(item, progress):
    progress.put(item)  # a Manager queue reaches the workers
    return item * model["scale"]


def crash(_):
    os._exit(1)  # a worker that dies


if __name__ == "__main__":
    with (
        multiprocessing.Manager() as manager,
        ProcessPoolExecutor(2, None, load_model, (10,)) as pool,
    ):
        progress = manager.Queue()
        scores = list(pool.map(score, range(1000), [progress] * 1000, chunksize=100))
        print("sum of scores:", sum(scores), "calls reported:", progress.qsize())
        try:
            pool.submit(crash, 0).result()
        except BrokenProcessPool as exc:  # batchpool.WorkerLostError, after its retries
            print("a worker died:", type(exc).__name__)
        print("the pool goes on:", pool.submit(pow, 2, 10).result())
