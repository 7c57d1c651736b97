"""`kgen caption` end to end: the tipo and chat backends on the real SmolLM2 GGUF, the openai
backend against llama-cpp-python's own OpenAI-compatible server (llama_cpp.server) serving it,
and against a recording server on 127.0.0.1 with fixed answers where a request's content, the
retries or the number of calls is what is checked. SmolLM2 writes junk: these tests check
behaviour (one caption per image, records, resume, exit codes), never the text.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from caption_data import BAD, GOOD, good_images, make_dataset

REPO_ROOT = Path(__file__).resolve().parent.parent
FAST = ("--max-tokens", "8", "--threads", "1", "--parallel", "4", "--seed", "5")


def env_for(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("KGEN_DEBUG", "KGEN_MODEL", "COLUMNS", "OPENAI_API_KEY")}
    env.update(KGEN_HOME=str(home), HF_HUB_CACHE=str(home / "hf-cache"), HF_HUB_OFFLINE="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def kgen(home: Path, *args: str, timeout: float = 600, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kgen_cli", "caption", *args], capture_output=True, text=True,
                          env=env_for(home, **extra), cwd=REPO_ROOT, timeout=timeout, stdin=subprocess.DEVNULL)


def records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def captions(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*.caption"))}


def check_first_run(root: Path, proc: subprocess.CompletedProcess, backend: str) -> list[dict]:
    assert proc.returncode == 1, proc.stderr[-2000:]  # the bad images failed
    recs = records(proc.stdout)
    assert sorted(r["index"] for r in recs) == list(range(len(GOOD) + len(BAD)))
    by_name = {Path(r["image"]).name: r for r in recs}
    for name, why in BAD.items():
        assert by_name[name]["status"] == "error" and why in by_name[name]["error"]
        assert f"{name}: " in proc.stderr
    written = captions(root)
    assert sorted(written) == sorted(Path(n).with_suffix(".caption").as_posix() for n in GOOD)
    for name in GOOD:
        r = by_name[Path(name).name]
        assert r["status"] == "written" and r["backend"] == backend and r["prompts"]
        text = written[Path(name).with_suffix(".caption").as_posix()]
        assert text.endswith("\n") and text.count("\n") == 1 and text.strip() == r["caption"]
    return recs


# -- local backends ----------------------------------------------------------------------------


@pytest.mark.model
def test_chat_backend_captions_resumes_and_applies_the_existing_policy(model_path, isolated_home, tmp_path):
    root = make_dataset(tmp_path / "ds")
    args = (str(root), "-r", "--backend", "chat", "-m", str(model_path), "--json", *FAST)
    first = check_first_run(root, kgen(isolated_home, *args), "chat")
    prompt = next(r for r in first if r["image"].endswith("a.png"))["prompts"][0]
    assert "1girl, solo, long hair, blue eyes, smile" in prompt  # weights gone, underscores spaced
    before = captions(root)

    again = kgen(isolated_home, *args)  # resume: nothing left to caption
    assert again.returncode == 1
    assert sorted(r["status"] for r in records(again.stdout)) == sorted(["skipped"] * len(GOOD) + ["error"] * 2)
    assert captions(root) == before

    appended = kgen(isolated_home, *args, "--existing", "append", "--trigger", "sks")
    after = captions(root)
    for name, text in after.items():
        lines = text.splitlines()
        assert lines[0] == before[name].strip() and lines[1].startswith("sks, ") and len(lines) == 2
    assert {r["status"] for r in records(appended.stdout) if r["status"] != "error"} == {"appended"}

    kgen(isolated_home, *args, "--existing", "prepend", "--prepend", "PRE")
    for name, text in captions(root).items():
        lines = text.splitlines()
        assert len(lines) == 3 and lines[0].startswith("PRE ") and lines[1:] == after[name].splitlines()

    same = kgen(isolated_home, *args, "--existing", "overwrite")
    assert {r["status"] for r in records(same.stdout) if r["status"] != "error"} == {"written"}
    assert captions(root) == before  # same seed, model and files: the same captions (within one machine)


@pytest.mark.model
def test_tipo_backend_gets_the_aspect_ratio_and_writes_captions(model_path, isolated_home, tmp_path):
    root = make_dataset(tmp_path / "ds")
    proc = kgen(isolated_home, str(root), "-r", "-m", str(model_path), "--json", "--nl-length", "very_short", *FAST,
                "--out-dir", str(tmp_path / "out"))
    assert proc.returncode == 1, proc.stderr[-2000:]
    recs = {Path(r["image"]).name: r for r in records(proc.stdout)}
    assert recs["a.png"]["prompts"][0].startswith("aspect_ratio: 0.7\n")  # 64 x 96
    assert recs["e.gif"]["prompts"][0].startswith("aspect_ratio: 2.0\n")  # 40 x 20
    out = captions(tmp_path / "out")
    assert sorted(out) == sorted(Path(n).with_suffix(".caption").as_posix() for n in GOOD)  # the tree mirrored
    assert not list(root.rglob("*.caption"))


@pytest.mark.model
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_then_rerun_gives_every_caption_exactly_once(model_path, isolated_home, tmp_path, sig):
    from PIL import Image

    root = tmp_path / "many"
    root.mkdir()
    for i in range(16):
        Image.new("RGB", (16 + i, 16)).save(root / f"img{i:02d}.png")
        (root / f"img{i:02d}.txt").write_text(f"1girl, item{i}")
    report = tmp_path / "report.jsonl"
    argv = [sys.executable, "-m", "kgen_cli", "caption", str(root), "--backend", "chat", "-m", str(model_path),
            "--max-tokens", "24", "--threads", "1", "--parallel", "2", "--seed", "1", "-o", str(report)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env=env_for(isolated_home), cwd=REPO_ROOT)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and not list(root.glob("*.caption")):
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr.decode()[-2000:]
    assert "interrupted:" in stderr.decode()
    first = captions(root)
    assert 1 <= len(first) < 16
    assert not list(root.glob(".*.tmp"))  # no partial file
    done = [json.loads(line) for line in report.read_text().splitlines()]
    assert sorted(Path(r["caption_file"]).name for r in done) == sorted(first)

    rerun = kgen(isolated_home, *argv[4:])
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    final = captions(root)
    assert len(final) == 16 and all(final[k] == v for k, v in first.items())
    assert all(text.count("\n") == 1 for text in final.values())  # each caption exactly once
    statuses = [json.loads(line)["status"] for line in report.read_text().splitlines()]
    assert statuses.count("skipped") == len(first) and statuses.count("written") == 16 - len(first)


# -- llama_cpp.server ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def llama_server(model_path, tmp_path_factory):
    """llama-cpp-python's OpenAI-compatible server on 127.0.0.1 serving SmolLM2 as 'smollm2'."""
    pytest.importorskip("llama_cpp.server.app", reason="pip install 'llama-cpp-python[server]'")
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(model_path), "--host",
                                 "127.0.0.1", "--port", str(port), "--model_alias", "smollm2", "--n_ctx", "2048",
                                 "--n_threads", "1", "--verbose", "False"], stdout=fh, stderr=fh,
                                stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        import urllib.request

        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(url + "/models", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"llama_cpp.server did not start: {log.read_text()[-2000:]}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.model
def test_openai_backend_against_llama_cpp_server(llama_server, isolated_home, tmp_path):
    root = make_dataset(tmp_path / "ds")
    proc = kgen(isolated_home, str(root), "-r", "--backend", "openai", "--base-url", llama_server,
                "--api-model", "smollm2", "--json", "--max-tokens", "8", "--parallel", "2", "--seed", "5")
    recs = check_first_run(root, proc, "openai")
    assert all(r["model"] == "openai:smollm2" for r in recs)
    again = kgen(isolated_home, str(root), "-r", "--backend", "openai", "--base-url", llama_server,
                 "--api-model", "smollm2", "--json", "--max-tokens", "8")
    assert sorted(r["status"] for r in records(again.stdout)) == sorted(["skipped"] * len(GOOD) + ["error"] * 2)


@pytest.mark.model
def test_openai_wrong_model_is_one_line_before_any_work(llama_server, isolated_home, tmp_path):
    root = make_dataset(tmp_path / "ds")
    proc = kgen(isolated_home, str(root), "--backend", "openai", "--base-url", llama_server, "--api-model", "gpt-9")
    assert proc.returncode == 1 and proc.stdout == ""
    assert "does not serve the model 'gpt-9'; it serves: smollm2" in proc.stderr and proc.stderr.count("\n") == 1
    assert not list(root.rglob("*.caption"))


def test_openai_unreachable_server_is_one_line(isolated_home, tmp_path):
    root = make_dataset(tmp_path / "ds")
    proc = kgen(isolated_home, str(root), "--backend", "openai", "--base-url", f"http://127.0.0.1:{free_port()}/v1",
                "--api-model", "m", timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "cannot reach the server at http://127.0.0.1:" in proc.stderr and proc.stderr.count("\n") == 1


# -- a recording server with fixed answers ---------------------------------------------------------


class Recorder(ThreadingHTTPServer):
    """An OpenAI-compatible stand-in: serves `models`, records every chat request, answers with
    `answer(body)`; the first `fail_first` chat requests get HTTP 503 (and are not recorded)."""

    daemon_threads = True

    def __init__(self, models=("chat-model", "vision-model"), fail_first=0, key=None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.models, self.fail_first, self.key = models, fail_first, key
        self.requests: list[dict] = []
        self.failed = 0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def answer(self, body: dict) -> str:
        content = body["messages"][0]["content"]
        if isinstance(content, list):
            return "An orange square on a plain background."
        if "wiki entry" in content:
            return f"Summary of {content.split(chr(34))[1]}."
        return "A caption."


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, code: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> bool:
        key = self.server.key
        if key and self.headers.get("Authorization") != f"Bearer {key}":
            self._send(401, {"error": {"message": f"Incorrect API key provided: {self.headers.get('Authorization')}"}})
            return False
        return True

    def do_GET(self):
        if self._authorised():
            self._send(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in self.server.models]})

    def do_POST(self):
        if not self._authorised():
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        with server.lock:
            fail = server.failed < server.fail_first
            server.failed += fail
            if not fail:
                server.requests.append(body)
        if fail:
            self._send(503, {"error": {"message": "busy"}})
            return
        self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": server.answer(body)}}]})


@pytest.fixture
def recorder():
    servers = []

    def start(**kwargs) -> Recorder:
        server = Recorder(**kwargs)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_vision_request_sends_the_image_as_a_data_uri_and_feeds_the_caption(recorder, isolated_home, tmp_path):
    import base64
    import io

    from PIL import Image

    server = recorder(fail_first=2)  # two 503s: retried with backoff
    root = make_dataset(tmp_path / "ds", bad=False)
    proc = kgen(isolated_home, str(root), "--backend", "openai", "--base-url", server.url, "--api-model",
                "chat-model", "--vision-model", "vision-model", "--json", "--seed", "3", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    vision = [r for r in server.requests if r["model"] == "vision-model"]
    chat = [r for r in server.requests if r["model"] == "chat-model" and isinstance(r["messages"][0]["content"], str)]
    n = len(good_images(root, recursive=False))
    assert server.failed == 2 and len(vision) == len(chat) == n and len(server.requests) == 2 * n
    sizes = set()
    for body in vision:
        text, image = body["messages"][0]["content"]
        assert text["type"] == "text" and image["type"] == "image_url"
        url = image["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        sizes.add(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size)
    assert sizes == {GOOD[name][0] for name in GOOD if "/" not in name}
    for r in records(proc.stdout):
        assert r["image_description"] == "An orange square on a plain background."
        assert "An orange square on a plain background." in r["prompts"][1]
    assert sorted(body["seed"] for body in chat) == [3 + i for i in range(n)]  # image i: seed S + i


def test_api_key_is_sent_but_never_shown(recorder, isolated_home, tmp_path):
    root = make_dataset(tmp_path / "ds", bad=False)
    server = recorder(key="sk-right")
    wrong = kgen(isolated_home, str(root), "--backend", "openai", "--base-url", server.url, "--api-model",
                 "chat-model", "--api-key-env", "MY_KEY", MY_KEY="sk-wrong-secret", timeout=60)
    assert wrong.returncode == 1 and "refused the API key" in wrong.stderr
    assert "sk-wrong-secret" not in wrong.stderr + wrong.stdout
    right = kgen(isolated_home, str(root), "--backend", "openai", "--base-url", server.url, "--api-model",
                 "chat-model", "--json", timeout=60, OPENAI_API_KEY="sk-right")
    assert right.returncode == 0 and "sk-right" not in right.stderr + right.stdout


def test_wiki_descriptions_are_cached_across_runs(recorder, isolated_home, tmp_path):
    root = make_dataset(tmp_path / "ds", bad=False)
    wiki = tmp_path / "wiki.jsonl"
    wiki.write_text("".join(json.dumps({"title": t, "body": f"h4. About\nThe [[{t}]] tag."}) + "\n"
                            for t in ("long_hair", "smile", "tree", "cat", "absent_tag")))
    server = recorder()
    args = (str(root), "--backend", "openai", "--base-url", server.url, "--api-model", "chat-model",
            "--wiki", str(wiki), "--json")
    first = kgen(isolated_home, *args, timeout=120)
    assert first.returncode == 0, first.stderr[-2000:]
    summaries = [r for r in server.requests if "wiki entry" in r["messages"][0]["content"]]
    assert sorted(r["messages"][0]["content"].split('"')[1] for r in summaries) == ["cat", "long hair", "smile", "tree"]
    assert "4 summarised" in first.stderr
    prompt = next(r for r in records(first.stdout) if r["image"].endswith("a.png"))["prompts"][0]
    assert "- long hair: Summary of long hair." in prompt

    server.requests.clear()
    for path in root.rglob("*.caption"):
        path.unlink()
    second = kgen(isolated_home, *args, timeout=120)
    assert second.returncode == 0
    assert not [r for r in server.requests if "wiki entry" in r["messages"][0]["content"]]
    assert "4 cached, 0 summarised" in second.stderr

    server.requests.clear()
    for path in root.rglob("*.caption"):
        path.unlink()
    only = kgen(isolated_home, str(root), "-r", "--backend", "openai", "--base-url", server.url, "--api-model",
                "chat-model", "--wiki", str(wiki), "--describe-only", timeout=120)
    assert only.returncode == 0 and not list(root.rglob("*.caption"))
    assert len(server.requests) == 0  # sub/ has no tag with a wiki page; the rest is cached
    assert only.stderr.startswith("tag descriptions: 4 cached, 0 summarised")


def test_progress_on_a_terminal_only_and_quiet_silences_it(recorder, isolated_home, tmp_path):
    from test_batch import run_with_stderr_tty

    root = make_dataset(tmp_path / "ds", bad=False)
    server = recorder()
    argv = [sys.executable, "-m", "kgen_cli", "caption", str(root), "-r", "--backend", "openai", "--base-url",
            server.url, "--api-model", "chat-model", "--existing", "overwrite"]
    rc, out, tty = run_with_stderr_tty(argv, isolated_home, timeout=60)
    assert rc == 0 and out == b""
    assert b"captioning" in tty and b"captions/s" in tty and f"/{len(GOOD)}".encode() in tty
    rc, out, tty = run_with_stderr_tty(argv + ["-q"], isolated_home, timeout=60)
    assert rc == 0 and out == b"" and tty == b""


@pytest.mark.model
def test_chat_prompts_come_from_llama_cpp_builtin_templates(model_path):
    from kgen_cli.engine import apply_chat_template, chat_template, chat_template_names
    from kgen_cli.errors import UsageError

    assert {"chatml", "llama3", "gemma"} <= set(chat_template_names())
    found = chat_template(model_path)  # SmolLM2's Jinja text, recognised as chatml (not evaluated)
    assert "{%" in found
    prompt = apply_chat_template(found, [("user", "Describe a cat.")])
    assert prompt == "<|im_start|>user\nDescribe a cat.<|im_end|>\n<|im_start|>assistant\n"
    assert apply_chat_template(chat_template(model_path, "llama3"), [("user", "x")]).endswith(
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    with pytest.raises(UsageError, match="unknown chat template 'nope'"):
        chat_template(model_path, "nope")
