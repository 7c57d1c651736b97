"""kgen: prompt upsampling with TIPO and DanTagGen models on llama.cpp.

Kept import-light on purpose: `kgen --help` must not load libllama or the tag lists.
"""

__version__ = "0.1.0"
