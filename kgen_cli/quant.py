"""GGUF quantisation types, one list for the registry's NAME@QTYPE and the engine's quantiser.

Import-light (no engine, no llama_cpp): parsing a model name must not load libllama.
"""

from __future__ import annotations

# Types a F16 (or BF16/F32) GGUF can be quantised to locally: the LLAMA_FTYPE_* that need no
# importance matrix (IQ1/IQ2/IQ3_XXS and Q2_K_S make llama_model_quantize fail without one).
LOCAL_QUANT_TYPES = (
    "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0",
    "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K", "IQ4_NL", "IQ4_XS",
)  # fmt: skip
# The float types a quantisation may start from.
QUANTIZABLE_SOURCES = ("F16", "BF16", "F32")
# Every type `engine.quantize_model` writes.
QUANT_TYPES = ("F32", "F16", "BF16", *LOCAL_QUANT_TYPES)
