"""Start-up time of the CLI: `tinystory --help`, `--version` and a completion request.

Target (issue 2): `tinystory --help` under 0.5 s wall on a 2-core machine. Runs each
command N times in fresh processes and prints the median, with the CPU named.

    python benchmarks/bench_cli.py [--runs 15]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

from _common import cpu_name


def time_command(argv: list[str], env: dict[str, str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    exe = shutil.which("tinystory") or sys.exit("tinystory is not installed (pip install -e .)")
    env = dict(os.environ)
    cases = {
        "tinystory --help": ([exe, "--help"], env),
        "tinystory --version": ([exe, "--version"], env),
        "tinystory train --help": ([exe, "train", "--help"], env),
        "completion (bash)": ([exe], {**env, "_TINYSTORY_COMPLETE": "complete_bash",
                                      "COMP_WORDS": "tinystory tr", "COMP_CWORD": "1"}),
        "python -c pass (floor)": ([sys.executable, "-c", "pass"], env),
    }
    time_command([exe, "--help"], env, 2)  # warm the page cache
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; {args.runs} runs each")
    print(f"{'command':<26} {'median s':>9} {'min s':>7} {'max s':>7}")
    for name, (argv, e) in cases.items():
        t = time_command(argv, e, args.runs)
        print(f"{name:<26} {statistics.median(t):9.3f} {min(t):7.3f} {max(t):7.3f}")


if __name__ == "__main__":
    main()
