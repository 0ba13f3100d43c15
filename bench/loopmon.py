"""Cost of the loop monitor (buffyfs.watchdog.LoopMonitor) per trio task step.

    python -m bench.loopmon             # 200,000 task steps, with and without it

Runs the same trio program (tasks that only checkpoint: the worst case, a step that
does nothing) with and without the instrument and prints the cost per step.
"""

from __future__ import annotations

import argparse
import time

import trio

from buffyfs.watchdog import LoopMonitor


async def _steps(tasks: int, per_task: int) -> None:
    async def one() -> None:
        for _ in range(per_task):
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        for _ in range(tasks):
            nursery.start_soon(one)


def _time(steps: int, monitored: bool) -> float:
    tasks = 20
    t = time.perf_counter()
    if monitored:
        with LoopMonitor() as monitor:
            trio.run(_steps, tasks, steps // tasks, instruments=[monitor])
    else:
        trio.run(_steps, tasks, steps // tasks)
    return time.perf_counter() - t


def measure(steps: int = 200_000, runs: int = 5) -> dict[str, float]:
    """Seconds per step without and with the monitor: the best of interleaved runs
    (the least disturbed by other work on the machine)."""
    plain, monitored = [], []
    for _ in range(runs):
        plain.append(_time(steps, False) / steps)
        monitored.append(_time(steps, True) / steps)
    return {"plain": min(plain), "monitored": min(monitored)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200_000)
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    m = measure(args.steps, args.runs)
    extra = m["monitored"] - m["plain"]
    print(f"task step without the monitor: {m['plain'] * 1e6:6.2f} us")
    print(f"task step with the monitor:    {m['monitored'] * 1e6:6.2f} us")
    print(f"cost per step: {extra * 1e6:.2f} us ({extra / m['plain']:.0%} of an empty step)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
