"""download.py: hub calls (mocked at kgen_cli.download's import site), sha256 checks, offline mode,
cache lookup, kgen's state files and the local quantisation flow (quantize_model faked)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from unittest.mock import MagicMock, patch

import pytest
from huggingface_hub import errors as hub_errors
from huggingface_hub.utils import are_progress_bars_disabled

from kgen_cli import download as dl
from kgen_cli.errors import DownloadError, EngineError, UsageError
from kgen_cli.download import resolve_model
from kgen_cli.registry import ModelSpec, load_registry

CONTENT = b"GGUF fake model bytes" * 100
SHA = hashlib.sha256(CONTENT).hexdigest()


def spec(**changes: object) -> ModelSpec:
    fields: dict = dict(name="tipo-x", family="tipo", repo="someone/TIPO-X-GGUF", file="tipo-x.Q8_0.gguf",
                        quant="Q8_0", context_length=1024)  # fmt: skip
    fields.update(changes)
    return ModelSpec(**fields)


class FakeHub:
    """Stands in for hf_hub_download: writes the file where the HF cache (blob + snapshot symlink)
    or a --local-dir would put it, and records the keyword arguments."""

    def __init__(self, root: Path, content: bytes = CONTENT):
        self.root = root
        self.content = content
        self.calls: list[dict] = []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        if kwargs.get("local_files_only") and not kwargs.get("local_dir") and not self._existing(kwargs).exists():
            raise hub_errors.LocalEntryNotFoundError("Cannot find the requested files in the disk cache")
        if kwargs.get("local_dir"):
            target = Path(kwargs["local_dir"]) / kwargs["filename"]
            if kwargs.get("local_files_only") and target.exists():
                return str(target)  # offline: what is there, as it is
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.content)
            return str(target)
        snapshot = self._existing(kwargs)
        blob = snapshot.parent.parent.parent / "blobs" / hashlib.sha256(self.content).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if kwargs.get("force_download") or not blob.exists():  # an up-to-date cached file is left alone
            blob.write_bytes(self.content)
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        if snapshot.is_symlink():
            snapshot.unlink()
        snapshot.symlink_to(blob)
        return str(snapshot)

    def _existing(self, kwargs) -> Path:
        repo_dir = "models--" + kwargs["repo_id"].replace("/", "--")
        return Path(kwargs.get("cache_dir") or self.root) / repo_dir / "snapshots" / ("0" * 40) / kwargs["filename"]


@pytest.fixture
def hub(tmp_path):
    fake = FakeHub(Path(os.environ["HF_HUB_CACHE"]))
    with patch("kgen_cli.download.hf_hub_download", side_effect=fake) as mocked:
        fake.mock = mocked
        yield fake


@pytest.fixture
def no_cache():
    with patch("kgen_cli.download.try_to_load_from_cache", return_value=None) as mocked:
        yield mocked


@pytest.fixture
def fake_engine(monkeypatch):
    """kgen_cli.engine.quantize_model replaced where download.py imports it from (the real one
    needs llama_cpp and an F16 GGUF; the engine's own tests run it)."""
    calls = []

    def quantize_model(src: Path, dst: Path, qtype: str, threads: int = 0, *, allow_requantize: bool = False) -> None:
        calls.append((Path(src), Path(dst), qtype))
        Path(dst).write_bytes(b"GGUF quantised " + qtype.encode())

    monkeypatch.setattr("kgen_cli.engine.quantize_model", quantize_model)
    return calls


# --- hf_hub_download arguments ------------------------------------------------------------------


def test_download_goes_to_the_hf_cache_with_these_arguments(hub):
    path = dl.download(spec())
    hub.mock.assert_called_once_with(
        repo_id="someone/TIPO-X-GGUF",
        filename="tipo-x.Q8_0.gguf",
        cache_dir=os.environ["HF_HUB_CACHE"],
        force_download=False,
        local_files_only=False,
    )
    assert path.read_bytes() == CONTENT
    assert path.is_symlink() and Path(os.environ["HF_HUB_CACHE"]) in path.parents


def test_force_downloads_again(hub):
    dl.download(spec(), force=True)
    assert hub.calls[0]["force_download"] is True


def test_local_dir_is_opt_in_and_remembered(hub, no_cache, tmp_path, isolated_home):
    target = tmp_path / "models"
    path = dl.download(spec(), local_dir=target)
    assert hub.calls[0] == {"repo_id": "someone/TIPO-X-GGUF", "filename": "tipo-x.Q8_0.gguf",
                            "local_dir": str(target), "force_download": False, "local_files_only": False}  # fmt: skip
    assert path == target / "tipo-x.Q8_0.gguf"
    # Later runs find it without the hub, and only for the same repo/file.
    assert dl.local_path(spec()) == path
    assert dl.local_path(spec(file="other.gguf")) is None
    recorded = json.loads((isolated_home / "local-files.json").read_text())
    assert recorded["tipo-x"]["path"] == str(path.resolve())


def test_hf_hub_cache_is_read_when_called(hub, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    dl.download(spec())
    assert hub.calls[0]["cache_dir"] == str(tmp_path / "elsewhere")
    monkeypatch.delenv("HF_HUB_CACHE")
    dl.download(spec())
    assert hub.calls[1]["cache_dir"] is None  # huggingface_hub's own default (HF_HOME/hub)


def test_quiet_turns_progress_bars_off_for_the_call_only(hub):
    seen = []
    hub_call = hub.mock.side_effect
    hub.mock.side_effect = lambda **kw: seen.append(are_progress_bars_disabled()) or hub_call(**kw)
    dl.download(spec(), quiet=True)
    dl.download(spec())
    assert seen == [True, False]
    assert not are_progress_bars_disabled()


def test_huggingface_hub_is_not_imported_by_the_module():
    import subprocess

    code = "import sys, kgen_cli.download, kgen_cli.registry; print('huggingface_hub' in sys.modules, 'yaml' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
    assert out.stdout.split() == ["False", "False"]


# --- sha256 / size ------------------------------------------------------------------------------


def test_sha256_match_returns_the_file_and_remembers_it(hub, isolated_home):
    path = dl.download(spec(sha256=SHA, size=len(CONTENT)))
    assert path.read_bytes() == CONTENT
    marker = json.loads((isolated_home / "verified.json").read_text())
    assert marker[str(path.resolve())]["sha256"] == SHA
    # The next lookups trust the marker instead of hashing the file again.
    with patch("kgen_cli.download.file_sha256", side_effect=AssertionError("hashed again")), \
         patch("kgen_cli.download.try_to_load_from_cache", return_value=str(path)):  # fmt: skip
        assert dl.local_path(spec(sha256=SHA)) == path
        assert dl.download(spec(sha256=SHA)) == path


def test_sha256_mismatch_fails_and_deletes_the_download(hub):
    with pytest.raises(DownloadError) as info:
        dl.download(spec(sha256="0" * 64))
    message = str(info.value)
    assert message.startswith("tipo-x: the downloaded tipo-x.Q8_0.gguf has sha256 ")
    assert f"expected {'0' * 64}; it was deleted" in message
    assert "models.yaml" in info.value.hint
    snapshot = Path(hub.calls[0]["cache_dir"]) / "models--someone--TIPO-X-GGUF" / "snapshots" / ("0" * 40)
    assert not (snapshot / "tipo-x.Q8_0.gguf").exists() and not (snapshot / "tipo-x.Q8_0.gguf").is_symlink()
    assert not any((snapshot.parent.parent / "blobs").iterdir())


def test_size_mismatch_fails_without_hashing(hub):
    with patch("kgen_cli.download.file_sha256", side_effect=AssertionError("hashed")):
        with pytest.raises(DownloadError, match=f"is {len(CONTENT)} bytes, expected 7"):
            dl.download(spec(size=7, sha256=SHA))


def test_bad_file_on_disk_is_refused_not_deleted(tmp_path):
    bad = tmp_path / "tipo-x.Q8_0.gguf"
    bad.write_bytes(b"corrupt")
    with patch("kgen_cli.download.try_to_load_from_cache", return_value=str(bad)):
        with pytest.raises(DownloadError) as info:
            dl.local_path(spec(sha256=SHA))
        assert info.value.hint == "run: kgen models download tipo-x --force"
        assert bad.exists()
        assert dl.local_path(spec(sha256=SHA), verify=False) == bad  # `models list` does not hash


@pytest.mark.parametrize("where", ["local_dir", "cache"])
def test_a_bad_file_already_there_is_refused_not_deleted_by_download(hub, tmp_path, where):
    """Offline, the hub hands back what is on disk: the user's own file in --local-dir, or a
    cached one. download() must not delete a file it did not write."""
    if where == "local_dir":
        existing = tmp_path / "mine" / "tipo-x.Q8_0.gguf"
        existing.parent.mkdir()
        existing.write_bytes(b"my own model")
        kwargs = {"local_dir": existing.parent}
    else:
        existing = dl.download(spec())  # cached by a download that matched its (absent) checks
        kwargs = {}
    with pytest.raises(DownloadError) as info, \
         patch("kgen_cli.download.try_to_load_from_cache", return_value=str(existing)):  # fmt: skip
        dl.download(spec(size=7), offline=True, **kwargs)
    assert "was deleted" not in str(info.value) and info.value.hint == "run: kgen models download tipo-x --force"
    assert existing.exists() and existing.stat().st_size != 7


def test_a_changed_file_is_hashed_again(tmp_path):
    good = tmp_path / "tipo-x.Q8_0.gguf"
    good.write_bytes(CONTENT)
    with patch("kgen_cli.download.try_to_load_from_cache", return_value=str(good)):
        assert dl.local_path(spec(sha256=SHA)) == good
        good.write_bytes(CONTENT[::-1])  # same size, new content and mtime
        os.utime(good, ns=(1, 1))
        with pytest.raises(DownloadError, match="has sha256"):
            dl.local_path(spec(sha256=SHA))


def test_file_sha256_streams(tmp_path):
    big = tmp_path / "big"
    big.write_bytes(os.urandom(3 * (1 << 20) + 5))
    assert dl.file_sha256(big) == hashlib.sha256(big.read_bytes()).hexdigest()


# --- offline and hub errors ---------------------------------------------------------------------


def test_offline_uses_only_local_files(hub):
    with patch("huggingface_hub.constants.HF_HUB_OFFLINE", True):
        assert dl.is_offline()
        with pytest.raises(DownloadError) as info:
            dl.download(spec())
    assert hub.calls[0]["local_files_only"] is True
    assert str(info.value) == "tipo-x: someone/TIPO-X-GGUF/tipo-x.Q8_0.gguf is not downloaded and HF_HUB_OFFLINE is set"
    assert info.value.hint == "unset HF_HUB_OFFLINE to download it"


def test_offline_returns_a_cached_file(hub):
    first = dl.download(spec())
    with patch("huggingface_hub.constants.HF_HUB_OFFLINE", True):
        assert dl.download(spec()) == first
    assert hub.calls[1]["local_files_only"] is True


def test_offline_argument_beats_the_environment(hub):
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE"):
        dl.download(spec(), offline=True)


def _http_error(cls, message="404 Client Error: Not Found for url: https://huggingface.co/x\n(Request ID: 1)"):
    return cls(message, response=MagicMock(headers={}))


@pytest.mark.parametrize(
    ("error", "message", "hint"),
    [
        (lambda: _http_error(hub_errors.RepositoryNotFoundError),
         "tipo-x: repository someone/TIPO-X-GGUF not found on the hub", "check its 'repo'"),
        (lambda: _http_error(hub_errors.GatedRepoError), "tipo-x: someone/TIPO-X-GGUF is gated on the hub", "HF_TOKEN"),
        (lambda: _http_error(hub_errors.RemoteEntryNotFoundError),
         "tipo-x: tipo-x.Q8_0.gguf not found in someone/TIPO-X-GGUF", "check its 'file'"),
        (lambda: hub_errors.LocalEntryNotFoundError("connection error and not cached"),
         "tipo-x: cannot reach the Hugging Face hub and someone/TIPO-X-GGUF/tipo-x.Q8_0.gguf is not cached",
         "network"),
        (lambda: _http_error(hub_errors.HfHubHTTPError, "500 Server Error\nretry later"),
         "tipo-x: download of someone/TIPO-X-GGUF/tipo-x.Q8_0.gguf failed: 500 Server Error retry later", None),
        (lambda: OSError(28, "No space left on device"),
         "tipo-x: download of someone/TIPO-X-GGUF/tipo-x.Q8_0.gguf failed: [Errno 28] No space left on device", None),
    ],
)  # fmt: skip
def test_hub_errors_become_one_line_download_errors(error, message, hint):
    with patch("kgen_cli.download.hf_hub_download", side_effect=error()):
        with pytest.raises(DownloadError) as info:
            dl.download(spec())
    assert str(info.value) == message
    assert "\n" not in str(info.value)
    if hint is not None:
        assert hint in info.value.hint


def test_unrelated_errors_are_not_disguised():
    with patch("kgen_cli.download.hf_hub_download", side_effect=KeyError("bug")):
        with pytest.raises(KeyError):
            dl.download(spec())


# --- cache lookup without network ---------------------------------------------------------------


def test_local_path_reads_a_real_hf_cache_layout():
    """No mocks: the real try_to_load_from_cache on a hand-made cache folder under HF_HUB_CACHE."""
    repo = Path(os.environ["HF_HUB_CACHE"]) / "models--someone--TIPO-X-GGUF"
    commit = "a" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "tipo-x.Q8_0.gguf").write_bytes(CONTENT)
    assert dl.local_path(spec(sha256=SHA)) == snapshot / "tipo-x.Q8_0.gguf"
    assert dl.local_path(spec(file="missing.gguf")) is None


def test_local_path_of_an_uncached_model_is_none(no_cache):
    assert dl.local_path(spec()) is None
    no_cache.assert_called_once_with(repo_id="someone/TIPO-X-GGUF", filename="tipo-x.Q8_0.gguf",
                                     cache_dir=os.environ["HF_HUB_CACHE"])  # fmt: skip


def test_corrupt_state_files_are_ignored(isolated_home, no_cache):
    (isolated_home / "local-files.json").write_text("{not json")
    (isolated_home / "verified.json").write_text("[1, 2]")
    assert dl.local_path(spec()) is None


# --- local quantisation -------------------------------------------------------------------------


def test_quant_downloads_the_f16_then_quantises_it_into_kgen_home(hub, fake_engine, isolated_home, no_cache):
    f16 = load_registry().get("tipo-500m-ft")
    path = dl.download(f16, quant="q8_0", quiet=True)
    assert path == isolated_home / "quantized" / "tipo-500m-ft-Q8_0.gguf"
    assert path.read_bytes() == b"GGUF quantised Q8_0"
    assert hub.calls[0]["repo_id"] == "KBlueLeaf/TIPO-500M-ft"
    assert hub.calls[0]["filename"] == "TIPO-500M-ft-F16.gguf"
    (src, dst, qtype), = fake_engine
    assert src.name == "TIPO-500M-ft-F16.gguf" and qtype == "Q8_0"
    assert dst.parent == path.parent and not dst.exists()  # written beside it, then renamed

    # The variant is now a model: NAME@QTYPE resolves to it, with the F16 model's prompt family.
    assert dl.local_path(load_registry().get("tipo-500m-ft@Q8_0")) == path
    resolved = resolve_model("tipo-500m-ft@Q8_0", None)
    assert (resolved.path, resolved.family, resolved.name) == (path, "tipo", "tipo-500m-ft@Q8_0")
    assert [s.name for s in dl.local_quantized(load_registry())] == ["tipo-500m-ft@Q8_0"]

    # Already there: no hub call, no quantisation; --force quantises again.
    dl.download(load_registry().get("tipo-500m-ft@Q8_0"))
    assert len(hub.calls) == 1 and len(fake_engine) == 1
    dl.download(f16, quant="Q8_0", force=True, quiet=True)
    assert len(fake_engine) == 2
    assert hub.calls[1]["force_download"] is False  # --force re-quantises; the F16 is fetched as usual


def test_failed_quantisation_leaves_nothing_behind(hub, monkeypatch, isolated_home):
    def broken(src, dst, qtype):
        Path(dst).write_bytes(b"half")
        raise EngineError("llama.cpp refused to quantise")

    monkeypatch.setattr("kgen_cli.engine.quantize_model", broken)
    with pytest.raises(EngineError, match="refused"):
        dl.download(load_registry().get("dtg-beta-f16"), quant="Q4_K_M", quiet=True)
    assert list((isolated_home / "quantized").iterdir()) == []


def test_missing_engine_is_a_clear_error(hub, monkeypatch):
    monkeypatch.setitem(sys.modules, "kgen_cli.engine", None)  # import fails
    with pytest.raises(EngineError) as info:
        dl.download(load_registry().get("tipo-100m"), quant="Q8_0", quiet=True)
    assert "llama-cpp-python" in info.value.hint


def test_quantised_models_cannot_be_quantised_again(hub):
    with pytest.raises(UsageError, match="already quantised"):
        dl.download(load_registry().get("tipo-500m-q8_0"), quant="Q4_K_M")
    assert hub.calls == []


# --- the first download: what, from where, how big; an unreachable hub fails fast --------------


def test_a_download_is_announced_on_stderr_before_it_starts(hub, quiet_hub, monkeypatch, capsys):
    monkeypatch.setattr("kgen_cli.download.hub_file_size", lambda repo, file, *, timeout: 540_629_120)
    announced = []
    hub_call = hub.mock.side_effect
    hub.mock.side_effect = lambda **kw: announced.append(capsys.readouterr()) or hub_call(**kw)
    path = dl.download(spec())
    assert announced[0].err == "downloading tipo-x (540.6 MB) from someone/TIPO-X-GGUF\n"
    assert announced[0].out == ""
    # Cached now: no announcement, no question to the hub's metadata.
    monkeypatch.setattr("kgen_cli.download.hub_file_size", lambda *a, **k: pytest.fail("asked the hub"))
    monkeypatch.setattr("kgen_cli.download.try_to_load_from_cache", lambda **kw: str(path))
    dl.download(spec())
    assert capsys.readouterr().err == ""


def test_the_registry_size_is_announced_and_quiet_announces_nothing(hub, quiet_hub, capsys):
    dl.download(spec(size=len(CONTENT)))
    assert capsys.readouterr().err == f"downloading tipo-x ({len(CONTENT) / 1000:.1f} KB) from someone/TIPO-X-GGUF\n"
    dl.download(spec(name="tipo-y", file="y.gguf"), quiet=True)
    assert capsys.readouterr().err == ""
    assert quiet_hub == [("someone/TIPO-X-GGUF", "tipo-x.Q8_0.gguf"), ("someone/TIPO-X-GGUF", "y.gguf")]


def test_an_unknown_size_is_left_out_of_the_announcement(hub, capsys):
    dl.download(spec())
    assert capsys.readouterr().err == "downloading tipo-x from someone/TIPO-X-GGUF\n"


@pytest.mark.parametrize("failure", [lambda: ConnectionError("[Errno 111] Connection refused"),
                                     lambda: TimeoutError("timed out")])  # fmt: skip
def test_an_unreachable_hub_is_asked_twice_then_fails_with_the_offline_hint(hub, monkeypatch, failure):
    asked = []

    def hub_file_size(repo, file, *, timeout):
        asked.append(timeout)
        raise failure()

    monkeypatch.setattr("kgen_cli.download.hub_file_size", hub_file_size)
    with pytest.raises(DownloadError) as info:
        dl.download(spec())
    assert str(info.value).startswith("tipo-x: cannot reach the Hugging Face hub (")
    assert "HF_HUB_OFFLINE=1" in info.value.hint and "-m PATH" in info.value.hint
    assert asked == [dl.HUB_TIMEOUT, dl.HUB_TIMEOUT]  # one retry, each attempt short
    assert hub.calls == []  # huggingface_hub's own long retries never start


def test_one_failed_attempt_is_retried(hub, monkeypatch):
    answers = [ConnectionError("reset"), 123]

    def hub_file_size(repo, file, *, timeout):
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr("kgen_cli.download.hub_file_size", hub_file_size)
    assert dl.download(spec()).read_bytes() == CONTENT


def test_a_refusal_from_the_hub_is_its_own_error_not_unreachable(hub, monkeypatch):
    def hub_file_size(repo, file, *, timeout):
        raise _http_error(hub_errors.RepositoryNotFoundError)

    monkeypatch.setattr("kgen_cli.download.hub_file_size", hub_file_size)
    with pytest.raises(DownloadError, match="repository someone/TIPO-X-GGUF not found on the hub"):
        dl.download(spec())
    assert hub.calls == []


def test_hub_sizes_are_asked_once_and_remembered(monkeypatch, isolated_home):
    asked = []

    def hub_file_size(repo, file, *, timeout):
        asked.append(file)
        return {"a.gguf": 10, "b.gguf": 20}.get(file)

    monkeypatch.setattr("kgen_cli.download.hub_file_size", hub_file_size)
    specs = [spec(name="a", file="a.gguf"), spec(name="b", file="b.gguf"), spec(name="c", file="c.gguf")]
    assert dl.hub_sizes(specs) == {"a": 10, "b": 20}
    assert sorted(asked) == ["a.gguf", "b.gguf", "c.gguf"]
    assert json.loads((isolated_home / "hub-sizes.json").read_text()) == {
        "someone/TIPO-X-GGUF/a.gguf": 10, "someone/TIPO-X-GGUF/b.gguf": 20}
    asked.clear()
    assert dl.hub_sizes(specs) == {"a": 10, "b": 20}
    assert asked == ["c.gguf"]  # only what is still unknown
    with patch("huggingface_hub.constants.HF_HUB_OFFLINE", True):
        asked.clear()
        assert dl.hub_sizes(specs) == {"a": 10, "b": 20}
        assert asked == []  # offline: what is remembered, no request


def test_hub_sizes_of_an_unreachable_hub_are_unknown(monkeypatch):
    def hub_file_size(repo, file, *, timeout):
        raise ConnectionError("refused")

    monkeypatch.setattr("kgen_cli.download.hub_file_size", hub_file_size)
    assert dl.hub_sizes([spec(name=f"m{i}", file=f"{i}.gguf") for i in range(20)]) == {}
