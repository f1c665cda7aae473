"""What a sleep/wake cycle costs a process in CPU on this host.

A worker that sleeps in epoll_wait and is woken pays for the switch out, the wake and the
switch back in (on a virtual machine, also the timer and interrupt exits). This measures it
with the plainest loop there is: ``time.sleep(interval)`` repeated, CPU from
``time.process_time``; once on an idle machine and once with every core kept busy by spinning
processes (as under load, where a wake also means waiting behind them for a CPU).

    .venv/bin/python bench/wake_cost.py [--json bench/results/DATE-wake-cost.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time


def cycle_cost_us(interval: float, seconds: float) -> float:
    n = max(1, int(seconds / interval))
    t0 = time.process_time()
    for _ in range(n):
        time.sleep(interval)
    return (time.process_time() - t0) / n * 1e6


def measure(seconds: float) -> dict[str, float]:
    return {f"sleep_{int(i * 1000)}ms": round(cycle_cost_us(i, seconds), 1) for i in (0.01, 0.05)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    p.add_argument("--json", help="where to write the result")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    idle = measure(args.seconds)
    spin = ("import sys, time\n"
            "end = time.monotonic() + float(sys.argv[1])\n"
            "while time.monotonic() < end:\n"
            "    pass\n")
    spinners = [subprocess.Popen([sys.executable, "-c", spin, str(args.seconds * 2 + 2)])
                for _ in range(cores)]
    try:
        time.sleep(0.5)
        busy = measure(args.seconds)
    finally:
        for proc in spinners:
            proc.kill()
            proc.wait()
    result = {"schema": "tidegate.bench.wake_cost/1",
              "date": datetime.date.today().isoformat(), "cores": cores,
              "cpu_us_per_sleep_wake_cycle": {"idle_machine": idle, "every_core_busy": busy}}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
