"""`kgen models list | download | path`: stdout purity, --json, exit codes (CliRunner, main(), a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest.mock import patch

import pytest
from typer.testing import CliRunner

from kgen_cli.cli import app, main
from kgen_cli.errors import ModelNotFoundError, RegistryError

REPO_ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """The console-script entry point with its error funnel: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out, err = capsys.readouterr()
    return info.value.code, out, err


@pytest.fixture
def cached(tmp_path):
    """Pretend the HF cache holds dtg-delta-q6_k's file (and nothing else)."""
    gguf = tmp_path / "ggml-model-Q6_K.gguf"
    gguf.write_bytes(b"GGUF" * 10)

    def lookup(*, repo_id, filename, cache_dir):
        return str(gguf) if (repo_id, filename) == ("KBlueLeaf/DanTagGen-delta", "ggml-model-Q6_K.gguf") else None

    with patch("kgen_cli.download.try_to_load_from_cache", side_effect=lookup):
        yield gguf


# --- list ---------------------------------------------------------------------------------------


def test_list_piped_is_tab_separated_lines(cached):
    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == 33
    rows = {line.split("\t")[0]: line.split("\t") for line in lines}
    assert all(len(row) == 6 for row in rows.values())
    assert rows["tipo-500m-q8_0"] == ["tipo-500m-q8_0", "tipo", "Q8_0", "540629120", "no", "yes"]
    assert rows["dtg-delta-q6_k"] == ["dtg-delta-q6_k", "dtg", "Q6_K", "40", "yes", "no"]  # size on disk
    assert rows["tipo-100m"] == ["tipo-100m", "tipo", "F16", "-", "no", "no"]
    assert [row[5] for row in rows.values()].count("yes") == 1


def test_list_json(cached):
    result = runner.invoke(app, ["models", "list", "--json"])
    assert result.exit_code == 0 and result.stderr == ""
    models = {m["name"]: m for m in json.loads(result.stdout)}
    assert len(models) == 33
    assert models["dtg-delta-q6_k"]["downloaded"] is True
    assert models["dtg-delta-q6_k"]["path"] == str(cached)
    assert models["dtg-delta-q6_k"]["quality_line"] is True
    default = models["tipo-500m-q8_0"]
    assert default["default"] is True and default["downloaded"] is False and default["path"] is None
    assert default["sha256"].startswith("f8882cda") and default["n_ctx"] == 1024 and default["base"] == "tipo-500m"
    assert sum(m["default"] for m in models.values()) == 1


def test_list_in_a_terminal_is_a_table(cached):
    with patch("kgen_cli.commands.models.stdout_is_tty", return_value=True):
        result = runner.invoke(app, ["models", "list"], env={"COLUMNS": "160"})
    assert result.exit_code == 0 and result.stderr == ""
    assert "Downloaded" in result.stdout and "\t" not in result.stdout
    assert "tipo-500m-q8_0 *" in result.stdout and "* default" in result.stdout
    assert "540.6 MB" in result.stdout


def test_list_shows_local_quantisations(isolated_home, cached):
    (isolated_home / "quantized").mkdir()
    (isolated_home / "quantized" / "tipo-500m-ft-Q4_K_M.gguf").write_bytes(b"GGUF")
    (isolated_home / "quantized" / "tipo-500m-q8_0-Q4_K_M.gguf").write_bytes(b"GGUF")  # not kgen's: ignored
    lines = runner.invoke(app, ["models", "list"]).stdout.splitlines()
    assert lines[-1] == "tipo-500m-ft@Q4_K_M\ttipo\tQ4_K_M\t4\tyes\tno"


def test_list_with_a_malformed_user_registry_exits_2_with_one_line(isolated_home, capsys):
    (isolated_home / "models.yaml").write_text("models:\n- name: tipo-x\n  famly: tipo\n")
    code, out, err = run_main(capsys, "models", "list")
    assert code == 2 and out == ""
    assert err == f"Error: {isolated_home / 'models.yaml'}: entry 'tipo-x': unknown key 'famly' (did you mean 'family'?)\n"
    assert isinstance(runner.invoke(app, ["models", "list"]).exception, RegistryError)


# --- path ---------------------------------------------------------------------------------------


def test_path_of_a_downloaded_model(cached):
    result = runner.invoke(app, ["models", "path", "dtg-delta-q6_k"])
    assert result.exit_code == 0 and result.stderr == ""
    assert result.stdout == f"{cached}\n"


def test_path_of_a_model_not_downloaded_fails_with_the_hint(cached, capsys):
    result = runner.invoke(app, ["models", "path", "dtg-beta-q8_0"])
    assert result.exit_code == 1 and result.stdout == ""
    assert isinstance(result.exception, ModelNotFoundError)
    code, out, err = run_main(capsys, "models", "path", "dtg-beta-q8_0")
    assert (code, out) == (1, "")
    assert err == "Error: model 'dtg-beta-q8_0' is not downloaded (run: kgen models download dtg-beta-q8_0)\n"


def test_path_without_a_name_is_the_default(cached, capsys):
    code, _, err = run_main(capsys, "models", "path")
    assert code == 1 and "tipo-500m-q8_0" in err


def test_path_of_an_unknown_model_exits_1_with_one_line(capsys):
    code, out, err = run_main(capsys, "models", "path", "dtg-delta-rev3-q6_k")
    assert (code, out) == (1, "")
    assert err.count("\n") == 1
    assert err.startswith("Error: unknown model 'dtg-delta-rev3-q6_k' (did you mean 'dtg-delta-rev2-q6_k'?)")


def test_path_of_a_local_quantisation(isolated_home):
    target = isolated_home / "quantized" / "dtg-gamma-f16-Q5_K_M.gguf"
    target.parent.mkdir()
    target.write_bytes(b"GGUF")
    result = runner.invoke(app, ["models", "path", "dtg-gamma-f16@q5_k_m"])
    assert result.exit_code == 0 and result.stdout == f"{target}\n"


# --- download -----------------------------------------------------------------------------------


def test_download_prints_only_the_path_on_stdout(tmp_path):
    gguf = tmp_path / "ggml-model-Q8_0.gguf"

    def fake(**kwargs):
        gguf.write_bytes(b"GGUF")
        return str(gguf)

    with patch("kgen_cli.download.hf_hub_download", side_effect=fake) as hub:
        result = runner.invoke(app, ["models", "download", "dtg-gamma-q8_0", "-q", "--force"])
    assert result.exit_code == 0, result.output
    assert (result.stdout, result.stderr) == (f"{gguf}\n", "")
    hub.assert_called_once_with(repo_id="KBlueLeaf/DanTagGen-gamma", filename="ggml-model-Q8_0.gguf",
                                cache_dir=os.environ["HF_HUB_CACHE"], force_download=True,
                                local_files_only=False)  # fmt: skip


def test_download_local_dir(tmp_path):
    def fake(**kwargs):
        target = Path(kwargs["local_dir"]) / kwargs["filename"]
        target.parent.mkdir(parents=True)
        target.write_bytes(b"GGUF")
        return str(target)

    with patch("kgen_cli.download.hf_hub_download", side_effect=fake) as hub:
        result = runner.invoke(app, ["models", "download", "tipo-100m", "--local-dir", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert hub.call_args.kwargs["local_dir"] == str(tmp_path / "m")
    assert result.stdout == f"{tmp_path / 'm' / 'TIPO-100M-F16.gguf'}\n"


def test_download_quant_quantises_locally(tmp_path, isolated_home, monkeypatch):
    f16 = tmp_path / "TIPO-200M-ft-F16.gguf"
    f16.write_bytes(b"GGUF f16")
    monkeypatch.setattr("kgen_cli.engine.quantize_model",
                        lambda src, dst, qtype: Path(dst).write_bytes(b"GGUF " + qtype.encode()))  # fmt: skip
    with patch("kgen_cli.download.hf_hub_download", return_value=str(f16)):
        result = runner.invoke(app, ["models", "download", "tipo-200m-ft", "--quant", "q6_k"])
        same = runner.invoke(app, ["models", "download", "tipo-200m-ft@Q6_K", "--quant", "Q6_K"])
    target = isolated_home / "quantized" / "tipo-200m-ft-Q6_K.gguf"
    assert result.exit_code == 0, result.output
    assert result.stdout == same.stdout == f"{target}\n"
    assert "quantising tipo-200m-ft to Q6_K" in result.stderr
    assert runner.invoke(app, ["models", "path", "tipo-200m-ft@Q6_K"]).stdout == f"{target}\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tipo-200m-ft@Q6_K", "--quant", "Q8_0"], "'tipo-200m-ft@Q6_K' and --quant Q8_0 disagree"),
        (["tipo-500m-q8_0", "--quant", "Q4_K_M"], "'tipo-500m-q8_0' is already quantised (Q8_0)"),
        (["tipo-100m", "--quant", "Q7"], "unknown quantisation type 'Q7'"),
        (["./my.gguf"], "'./my.gguf' is a file path; this command takes a registry name"),
    ],
)
def test_download_usage_errors_exit_2(capsys, args, message):
    with patch("kgen_cli.download.hf_hub_download", side_effect=AssertionError("no download")):
        code, out, err = run_main(capsys, "models", "download", *args)
    assert (code, out) == (2, "")
    assert err.startswith(f"Error: {message}") and err.count("\n") == 1


def test_download_offline_not_cached_exits_1(capsys):
    from huggingface_hub import errors

    with patch("huggingface_hub.constants.HF_HUB_OFFLINE", True), \
         patch("kgen_cli.download.hf_hub_download", side_effect=errors.LocalEntryNotFoundError("not cached")):  # fmt: skip
        code, out, err = run_main(capsys, "models", "download", "dtg-beta-q6_k")
    assert (code, out) == (1, "")
    assert err == ("Error: dtg-beta-q6_k: KBlueLeaf/DanTagGen-beta/ggml-model-Q6_K.gguf is not downloaded and "
                   "HF_HUB_OFFLINE is set (unset HF_HUB_OFFLINE to download it)\n")  # fmt: skip


# --- the real console script --------------------------------------------------------------------


def _kgen(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "KGEN_HOME": str(home), "HF_HUB_CACHE": str(home / "hf-cache"), "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "kgen_cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO_ROOT, timeout=60)  # fmt: skip


def test_subprocess_models_list_is_clean_tsv(isolated_home):
    proc = _kgen("models", "list", home=isolated_home)
    assert proc.returncode == 0
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert len(lines) == 33
    assert all(len(line.split("\t")) == 6 for line in lines)
    assert "tipo-500m-q8_0\ttipo\tQ8_0\t540629120\tno\tyes" in lines


def test_subprocess_models_path_not_downloaded_exits_1(isolated_home):
    proc = _kgen("models", "path", "tipo-100m", home=isolated_home)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == ("Error: model 'tipo-100m' is not downloaded "
                           "(HF_HUB_OFFLINE is set; unset it, then run: kgen models download tipo-100m)\n")  # fmt: skip


def test_a_file_of_the_wrong_size_is_not_listed_as_downloaded(tmp_path):
    """models path and expand refuse such a file; list and info must not call it downloaded."""
    bad = tmp_path / "KBlueLeaf.TIPO-500M.Q8_0.gguf"
    bad.write_bytes(b"GGUF" * 10)

    def lookup(*, repo_id, filename, cache_dir):
        return str(bad) if filename == "KBlueLeaf.TIPO-500M.Q8_0.gguf" else None

    with patch("kgen_cli.download.try_to_load_from_cache", side_effect=lookup):
        models = {m["name"]: m for m in json.loads(runner.invoke(app, ["models", "list", "--json"]).stdout)}
        rows = {line.split("\t")[0]: line.split("\t") for line in runner.invoke(app, ["models", "list"]).stdout.splitlines()}
        from kgen_cli.commands.info import collect

        present = collect()["models_present"]
    row = models["tipo-500m-q8_0"]
    assert row["downloaded"] is False and row["path"] == str(bad) and row["size"] == 540629120
    assert row["problem"] == "is 40 bytes, expected 540629120"
    assert rows["tipo-500m-q8_0"][3:5] == ["540629120", "corrupt"]
    assert "tipo-500m-q8_0" not in present


@pytest.mark.parametrize("good", [True, False], ids=["good", "corrupt"])
def test_list_info_and_path_agree_on_a_file_checked_lazily_against_its_sha256(tmp_path, isolated_home, capsys, good):
    """Right size, sha256 never checked: "unverified" (list does not hash 500 MB files); the
    first use hashes it, and from then on list, info and path all say the same thing."""
    import hashlib

    content = b"GGUF tiny model"
    sha = hashlib.sha256(content if good else b"something else").hexdigest()
    (isolated_home / "models.yaml").write_text(
        f"models:\n  - {{name: tiny, family: tipo, repo: someone/tiny, file: tiny.gguf, quant: Q8_0,"
        f" context_length: 1024, size: {len(content)}, sha256: {sha}}}\n", encoding="utf-8")
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(content)
    from kgen_cli.commands.info import collect

    def states():
        rows = {line.split("\t")[0]: line.split("\t")[4] for line in run_main(capsys, "models", "list")[1].splitlines()}
        listed = {m["name"]: m for m in json.loads(run_main(capsys, "models", "list", "--json")[1])}["tiny"]
        info = collect()
        return rows["tiny"], listed["status"], listed["downloaded"], "tiny" in info["models_present"], \
            "tiny" in info["models_unverified"], "tiny" in info["models_corrupt"]

    with patch("kgen_cli.download.try_to_load_from_cache",
               side_effect=lambda *, repo_id, filename, cache_dir: str(gguf) if filename == "tiny.gguf" else None):
        assert states() == ("unverified", "unverified", True, True, True, False)
        code, out, err = run_main(capsys, "models", "path", "tiny")  # the first use hashes it
        if good:
            assert (code, out, err) == (0, f"{gguf}\n", "")
            assert states() == ("yes", "yes", True, True, False, False)
        else:
            assert code == 1 and out == "" and "has sha256" in err
            assert states() == ("corrupt", "corrupt", False, False, False, True)
            assert run_main(capsys, "models", "path", "tiny")[0] == 1  # refused again, not re-hashed silently


# --- the hub at the network boundary: a real server on 127.0.0.1 as HF_ENDPOINT ------------------


class _Hub:
    """A stand-in for huggingface.co on 127.0.0.1: answers every file's HEAD with a size
    (`answer=True`), or reads requests and never answers (`answer=False`). Counts the HEAD
    requests (the metadata kgen asks for; huggingface_hub makes other requests of its own)."""

    def __init__(self, answer: bool, size: int = 1234):
        import socket
        import threading

        self.answer, self.size, self.heads = answer, size, 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.held = []
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(5)
            try:
                self.heads += conn.recv(65536).startswith(b"HEAD ")
            except OSError:
                pass
            if not self.answer:
                self.held.append(conn)  # silent: the client's timeout must end it
                continue
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nETag: \"abc\"\r\nX-Repo-Commit: " + b"a" * 40
                         + f"\r\nX-Linked-Size: {self.size}\r\nConnection: close\r\n\r\n".encode())  # fmt: skip
            conn.close()

    def close(self):
        self.sock.close()
        for conn in self.held:
            conn.close()


def _kgen_online(*args: str, home: Path, endpoint: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KGEN_HOME": str(home), "HF_HUB_CACHE": str(home / "hf-cache"), "HF_ENDPOINT": endpoint}
    env.pop("HF_HUB_OFFLINE", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "kgen_cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO_ROOT, timeout=120, stdin=subprocess.DEVNULL)  # fmt: skip


def test_models_list_fills_sizes_from_the_hub_and_remembers_them(isolated_home):
    hub = _Hub(answer=True)
    try:
        proc = _kgen_online("models", "list", home=isolated_home, endpoint=hub.url)
    finally:
        hub.close()
    assert proc.returncode == 0, proc.stderr
    rows = {line.split("\t")[0]: line.split("\t") for line in proc.stdout.splitlines()}
    assert rows["tipo-100m"][3] == "1234"  # no size in the registry: the hub's
    assert rows["tipo-500m-q8_0"][3] == "540629120"  # the registry's own
    assert "-" not in [row[3] for row in rows.values()]
    # Remembered: the next listing knows them without the hub (now gone), and so does offline.
    again = _kgen("models", "list", home=isolated_home)
    assert again.stdout == proc.stdout


@pytest.mark.parametrize("command", [("models", "download", "tipo-100m"), ("expand", "1girl, dragon horns")])
def test_an_unreachable_hub_fails_in_two_short_attempts_with_the_offline_hint(isolated_home, command):
    """The hub accepts connections and never answers (huggingface_hub alone would wait 10 s,
    then retry with a 60 s timeout): two attempts of HUB_TIMEOUT, then one line."""
    import time

    from kgen_cli.download import HUB_TIMEOUT

    hub = _Hub(answer=False)
    started = time.monotonic()
    try:
        proc = _kgen_online(*command, home=isolated_home, endpoint=hub.url)
    finally:
        hub.close()
    elapsed = time.monotonic() - started
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "cannot reach the Hugging Face hub" in proc.stderr
    assert "HF_HUB_OFFLINE=1" in proc.stderr and "-m PATH" in proc.stderr
    assert hub.heads == 2
    assert elapsed < 2 * HUB_TIMEOUT + 20  # far below huggingface_hub's own minutes of retries


def test_a_refused_connection_fails_at_once(isolated_home):
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    proc = _kgen_online("models", "download", "tipo-100m", home=isolated_home, endpoint=f"http://127.0.0.1:{port}")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("Error: tipo-100m: cannot reach the Hugging Face hub (")


# --- your own files and any hub file: path: entries, hf:, KGEN_FAMILY; models rm -----------------


def _user_registry(home: Path, text: str) -> None:
    (home / "models.yaml").write_text(text, encoding="utf-8")


def test_a_path_entry_names_a_local_file(isolated_home, tmp_path, capsys):
    gguf = isolated_home / "mine" / "finetune.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF mine")
    _user_registry(isolated_home, "models:\n  - {name: mine, family: dtg, path: mine/finetune.gguf}\n"
                                  "  - {name: gone, family: tipo, path: /nonexistent/x.gguf}\n")  # fmt: skip
    from kgen_cli.download import resolve_model

    resolved = resolve_model("mine", None)
    assert (resolved.path, resolved.family, resolved.n_ctx) == (gguf, "dtg", None)  # relative to models.yaml
    assert run_main(capsys, "models", "path", "mine")[1] == f"{gguf}\n"
    rows = {m["name"]: m for m in json.loads(run_main(capsys, "models", "list", "--json")[1])}
    assert rows["mine"]["status"] == "yes" and rows["mine"]["local_path"] == str(gguf) and rows["mine"]["size"] == 9
    assert rows["gone"]["status"] == "no"
    code, out, err = run_main(capsys, "models", "path", "gone")
    assert code == 1 and "no such file /nonexistent/x.gguf" in err
    code, out, err = run_main(capsys, "models", "download", "mine")
    assert (code, out) == (2, "") and "local file" in err
    code, out, err = run_main(capsys, "models", "rm", "mine")
    assert (code, out) == (2, "") and "does not delete it" in err and gguf.exists()


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("{name: x, family: tipo, path: a.gguf, repo: a/b, file: c.gguf}", "either 'path'"),
        ("{name: x, family: tipo}", "missing key 'repo'"),
        ("{name: x, path: a.gguf}", "missing key 'family'"),
        ("{name: x, family: tipo, path: ''}", "'path' must name a .gguf file"),
    ],
)
def test_path_entries_are_validated(isolated_home, entry, message):
    from kgen_cli.registry import load_registry

    _user_registry(isolated_home, f"models:\n  - {entry}\n")
    with pytest.raises(RegistryError, match=message):
        load_registry()


def test_the_packaged_registry_takes_no_path_entries():
    from kgen_cli.registry import _parse

    with pytest.raises(RegistryError, match="your own models.yaml only"):
        _parse("packaged", "default: x\nmodels:\n  - {name: x, family: tipo, path: a.gguf}\n", require_models=True)


def test_hf_model_downloads_any_hub_gguf_with_the_family_of_a_local_file(tmp_path, monkeypatch):
    from kgen_cli.download import resolve_model
    from kgen_cli.registry import family_note

    calls = []

    def fake(**kwargs):
        calls.append(kwargs)
        target = tmp_path / kwargs["filename"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"GGUF")
        return str(target)

    monkeypatch.delenv("KGEN_FAMILY", raising=False)
    with patch("kgen_cli.download.hf_hub_download", side_effect=fake):
        resolved = resolve_model("hf:someone/Some-GGUF/sub/model-Q8_0.gguf", "dtg", download_missing=True)
        assert (calls[0]["repo_id"], calls[0]["filename"]) == ("someone/Some-GGUF", "sub/model-Q8_0.gguf")
        assert (resolved.name, resolved.family, resolved.family_assumed) == \
            ("hf:someone/Some-GGUF/sub/model-Q8_0.gguf", "dtg", False)  # fmt: skip
        assumed = resolve_model("hf:someone/Some-GGUF/model.gguf", None, download_missing=True)
        assert (assumed.family, assumed.family_assumed) == ("tipo", True) and family_note(assumed)
        monkeypatch.setenv("KGEN_FAMILY", "dtg")
        told = resolve_model("hf:someone/Some-GGUF/model.gguf", None, download_missing=True)
        assert (told.family, told.family_assumed, family_note(told)) == ("dtg", False, None)
        by_name = resolve_model("hf:someone/TIPO-GGUF/tipo-200m.gguf", None, download_missing=True)
        assert by_name.family == "tipo"  # the name says so: KGEN_FAMILY is for files that say neither


@pytest.mark.parametrize("bad", ["hf:someone/model.gguf", "hf:someone/repo/model.bin", "hf:/x/y.gguf"])
def test_a_malformed_hf_model_is_a_usage_error(capsys, bad):
    code, out, err = run_main(capsys, "expand", "1girl", "-m", bad, "--show-prompt")
    assert (code, out) == (2, "") and "is not hf:OWNER/REPO/FILE.gguf" in err


def test_kgen_family_sets_the_family_of_a_local_file_and_silences_the_note(tmp_path, monkeypatch, capsys):
    gguf = tmp_path / "renamed.gguf"
    gguf.write_bytes(b"GGUF")
    code, out, err = run_main(capsys, "expand", "1girl", "-m", str(gguf), "--show-prompt")
    assert code == 0 and "names neither TIPO nor DTG" in err and "KGEN_FAMILY" in err
    dtg_prompt = run_main(capsys, "expand", "1girl", "-m", str(gguf), "--family", "dtg", "--show-prompt")[1]
    monkeypatch.setenv("KGEN_FAMILY", "dtg")
    assert run_main(capsys, "expand", "1girl", "-m", str(gguf), "--show-prompt") == (0, dtg_prompt, "")  # no note
    assert dtg_prompt != out
    monkeypatch.setenv("KGEN_FAMILY", "sdxl")
    code, out, err = run_main(capsys, "expand", "1girl", "-m", str(gguf), "--show-prompt")
    assert code == 2 and "unknown family 'sdxl' (KGEN_FAMILY)" in err


def test_models_rm_deletes_the_file_and_its_quantisations_and_says_what_it_freed(isolated_home, capsys):
    cache = Path(os.environ["HF_HUB_CACHE"]) / "models--KBlueLeaf--TIPO-200M-ft"
    commit = "b" * 40
    (cache / "refs").mkdir(parents=True)
    (cache / "refs" / "main").write_text(commit)
    blob = cache / "blobs" / "0123abcd"
    blob.parent.mkdir()
    blob.write_bytes(b"x" * 1500)
    link = cache / "snapshots" / commit / "TIPO-200M-ft-F16.gguf"
    link.parent.mkdir(parents=True)
    link.symlink_to(blob)
    quantized = isolated_home / "quantized"
    quantized.mkdir()
    (quantized / "tipo-200m-ft-Q8_0.gguf").write_bytes(b"q" * 800)
    (quantized / "tipo-200m-ft-Q4_0.gguf").write_bytes(b"q" * 400)

    code, out, err = run_main(capsys, "models", "rm", "tipo-200m-ft@Q4_0")
    assert (code, out, err) == (0, f"{quantized / 'tipo-200m-ft-Q4_0.gguf'}\n", "removed tipo-200m-ft@Q4_0: 400 B freed\n")
    code, out, err = run_main(capsys, "models", "rm", "tipo-200m-ft")
    assert code == 0
    assert out.splitlines() == [str(link), str(quantized / "tipo-200m-ft-Q8_0.gguf")]
    assert err == "removed tipo-200m-ft: 2.3 KB freed\n"
    assert not blob.exists() and not link.is_symlink() and not any(quantized.iterdir())
    code, out, err = run_main(capsys, "models", "rm", "tipo-200m-ft")
    assert (code, out) == (1, "") and "is not downloaded" in err
