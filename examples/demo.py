"""A tour of batchpool on the embedded default: local worker processes, a local storage folder.

Run it with:  pip install . && python examples/demo.py
"""

import asyncio
import concurrent.futures as cf
import math

from batchpool import BatchPoolExecutor


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, math.isqrt(n) + 1))


def fragile(x: int) -> float:
    return 1 / (x - 3)


def main() -> None:
    with BatchPoolExecutor() as bpe:
        print("run stored at", bpe.run_url)
        print(list(bpe.map(lambda x: x * 3, range(4))))  # [0, 3, 6, 9]
        f = bpe.submit(lambda x, y, z: x + y + z, "poly", "ethyl", z="ene")
        print(f.result())  # polyethylene

        primes = sum(bpe.map(is_prime, range(200_000)))
        print(f"{primes} primes below 200,000")

        futures = {bpe.submit(fragile, x): x for x in range(5)}
        for future in cf.as_completed(futures):
            x = futures[future]
            try:
                print(f"fragile({x}) = {future.result():.3f}")
            except ZeroDivisionError as exc:  # raised remotely, re-raised as its own type
                print(f"fragile({x}) raised {type(exc).__name__}; remote traceback:")
                print("   ", str(exc.__cause__).strip().splitlines()[-1])

    async def async_tour() -> None:
        async with BatchPoolExecutor() as bpe:
            fut = await bpe.async_submit(pow, 2, 10)
            print(await fut)  # 1024
            async for r in await bpe.async_map(lambda x, y: x + y, [range(3), range(3)]):
                print(r)  # 0 2 4

    asyncio.run(async_tour())


if __name__ == "__main__":
    main()
