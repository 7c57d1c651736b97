"""Wall time of `kgen expand ... --show-prompt` (process start included) against `python -c pass`.

Target (issue 2): ≤ 0.5 s wall. The tag lists are binary-searched through mmap, not loaded.

    python benchmarks/show_prompt.py [--runs 10]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

PROMPT = "1girl, hatsune miku, vocaloid, ask \\(askzy\\), solo, twintails, masterpiece, absurdres, sensitive"


def wall(cmd: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    baseline = wall([sys.executable, "-c", "pass"], args.runs)
    show = wall([sys.executable, "-m", "kgen_cli", "expand", PROMPT, "--show-prompt", "--model", "tipo-500m"], args.runs)
    dtg = wall([sys.executable, "-m", "kgen_cli", "expand", PROMPT, "--show-prompt", "--model", "dtg-delta-rev2-q8_0"], args.runs)
    helps = wall([sys.executable, "-m", "kgen_cli", "--help"], args.runs)
    base = statistics.median(baseline)
    print(f"{'command':38} {'median s':>9} {'max s':>7} {'x python start':>15}")
    for name, t in [("python -c pass", baseline), ("kgen --help", helps),
                    ("kgen expand --show-prompt (TIPO)", show), ("kgen expand --show-prompt (DTG)", dtg)]:
        print(f"{name:38} {statistics.median(t):9.3f} {max(t):7.3f} {statistics.median(t) / base:15.1f}")
    verdict = "OK" if statistics.median(show) <= 0.5 else "MISSED"
    print(f"target --show-prompt <= 0.5 s: {verdict} ({statistics.median(show):.3f} s)")


if __name__ == "__main__":
    main()
