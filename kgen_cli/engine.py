"""The only module in kgen that talks to llama.cpp (through llama-cpp-python's low-level bindings).

`llama_cpp` is imported lazily, on the first call that needs it, so `import kgen_cli.engine` stays
cheap and `kgen --help` never loads libllama. Everything that could make llama.cpp *abort the
process* (an out-of-range sequence id in `llama_memory_seq_cp`, sampling a batch row that has no
logits, `n_seq_max > 256`, a malformed GGUF) is validated here in Python first; see
docs/design.md#llama-cpp-traps.

Layout:
  1. GGUF header check (pure Python, no llama_cpp needed)
  2. loading the bindings (after the OpenMP wait policy is in the environment, kgen_cli/threads.py)
     and routing llama.cpp's log
  3. `kgen info` helpers and `quantize_model`
  3b. chat prompts through llama.cpp's built-in templates (no Jinja is run)
  4. sampler chains
  5. `Engine`: owns the model, the context and the batch
  6. `BranchDecoder`: many KV sequences in the Engine's context (fork / free / step / sample);
     the one generation loop that drives it is `scheduler.Scheduler`
"""

from __future__ import annotations

import collections
import ctypes
import importlib
import importlib.util
import math
import mmap
import os
import signal
import struct
import sys
import threading
import types
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from kgen_cli import threads as _threads
from kgen_cli.errors import EngineError, UsageError
from kgen_cli.quant import QUANT_TYPES
from kgen_cli.sampling import MAX_N_CTX, MAX_SEQUENCES, SamplingParams, validate_params

# The decoder protocol's value types live with the tree sampler (pure Python); the engine is its
# llama.cpp implementation and raises / returns exactly these.
from kgen_cli.decoding import BranchPoolExhausted, Sampled

__all__ = [
    "BranchDecoder", "BranchPoolExhausted", "DecodeCounters", "Engine",
    "QUANT_TYPES", "Sampled", "Sampler", "apply_chat_template", "bindings_version", "chat_template",
    "chat_template_names", "check_gguf", "devices", "gguf_metadata",
    "gpu_offload_supported", "llama_version", "quantize_model", "sampler_chain", "system_info",
]  # fmt: skip

if TYPE_CHECKING:
    from types import ModuleType


# llama.cpp rounds the context up to a multiple of 256 cells (src/llama-context.cpp:290) *after*
# clamping n_batch to the unrounded n_ctx; we round first so that n_batch == the real n_ctx.
_CTX_PAD = 256


# ---------------------------------------------------------------------------------------------
# 1. GGUF header check
# ---------------------------------------------------------------------------------------------

GGUF_MAGIC = b"GGUF"

# Architectures known to the llama.cpp vendored in llama-cpp-python 0.3.36
# (LLM_ARCH_NAMES in src/llama-arch.cpp; "clip" is left out: it names vision projectors, which
# are not language models). llama.cpp itself has no API to list them.
SUPPORTED_ARCHITECTURES = frozenset(
    """
    llama llama4 deci falcon grok gpt2 gptj gptneox mpt baichuan starcoder refact bert modern-bert
    nomic-bert nomic-bert-moe neo-bert jina-bert-v2 jina-bert-v3 eurobert bloom stablelm qwen qwen2
    qwen2moe qwen2vl qwen3 qwen3moe qwen3next qwen3vl qwen3vlmoe qwen35 qwen35moe qwen4exp phi2
    phi3 phimoe plamo plamo2 plamo3 codeshell orion internlm2 minicpm minicpm3 gemma gemma2 gemma3
    gemma3n gemma4 gemma4-assistant gemma-embedding starcoder2 mamba mamba2 maple jamba falcon-h1
    xverse command-r cohere2 cohere2moe dbrx olmo olmo2 olmoe muse-glimmer openelm arctic deepseek
    deepseek2 deepseek2-ocr deepseek32 deepseek4 chatglm glm4 glm4moe glm-dsa bitnet t5 t5encoder
    jais jais2 nemotron nemotron_h nemotron_h_moe exaone exaone4 exaone-moe rwkv6 rwkv6qwen2 rwkv7
    arwkv7 granite granitemoe granitehybrid graniteswitch granite_swa chameleon wavtokenizer-dec
    plm bailingmoe bailingmoe2 bailingmoe3 dots1 dots3note arcee afmoe laguna ernie4_5 ernie4_5-moe
    hunyuan-moe hunyuan-dense hunyuan_vl hy_v3 hy_v4 smollm3 gpt-oss lfm2 lfm2moe dream
    smallthinker llada llada-moe seed_oss grovemoe apertus minimax-01 hrm_text minimax-m2
    minimax-m3 cogvlm rnd1 pangu-embedded mistral3 eagle3 dflash mistral4 paddleocr mimo2 step35
    spark2_5 llama-embed maincoder kimi-linear kimi-k3 glm5-next talkie mellum nanbeige qwen3tts
    """.split()
)

# GGUF value types -> struct format of a scalar (GGUF_TYPE_* in ggml/include/gguf.h).
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}

# ggml tensor types -> (elements per block, bytes per block), checked against libggml's
# ggml_blck_size / ggml_type_size in the tests. A type missing here only skips the size check.
_GGML_TYPE_SIZES = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
    9: (32, 36), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210),
    15: (256, 292), 16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18),
    21: (256, 110), 22: (256, 82), 23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8),
    28: (1, 8), 29: (256, 56), 30: (1, 2), 34: (256, 54), 35: (256, 66), 39: (32, 17),
    40: (64, 36), 41: (128, 18), 42: (64, 18),
}  # fmt: skip


_U64 = struct.Struct("<Q")


class _Truncated(Exception):
    pass


class _GGUFReader:
    """Sequential little-endian reads over a memory-mapped file; reading past the end raises."""

    def __init__(self, buf: mmap.mmap | bytes):
        self.buf = buf
        self.pos = 0
        self.size = len(buf)

    def take(self, n: int) -> int:
        start = self.pos
        if n < 0 or start + n > self.size:
            raise _Truncated
        self.pos = start + n
        return start

    def scalar(self, fmt: str) -> Any:
        start = self.take(struct.calcsize(fmt))
        return struct.unpack_from(fmt, self.buf, start)[0]

    def string(self) -> bytes:
        n = self.scalar("<Q")
        start = self.take(n)
        return bytes(self.buf[start : start + n])

    def skip_string(self) -> None:
        self.take(self.scalar("<Q"))

    def skip_strings(self, count: int) -> None:
        """Skip `count` strings: tokenizer vocabularies and merges (~100k strings) must be walked
        one length at a time, so this loop is kept tight (every `kgen expand` runs it)."""
        buf, pos, size, unpack = self.buf, self.pos, self.size, _U64.unpack_from
        for _ in range(count):
            if pos + 8 > size:
                raise _Truncated
            pos += 8 + unpack(buf, pos)[0]
        if pos > size:
            raise _Truncated
        self.pos = pos

    def value(self, vtype: int, keep: bool) -> Any:
        if vtype == _GGUF_STRING:
            if keep:
                return self.string().decode("utf-8", "replace")
            self.skip_string()
            return None
        if vtype in _GGUF_SCALARS:
            return self.scalar(_GGUF_SCALARS[vtype])
        if vtype == _GGUF_ARRAY:
            etype, count = self.scalar("<I"), self.scalar("<Q")
            if etype == _GGUF_STRING:
                self.skip_strings(count)
            elif etype in _GGUF_SCALARS:
                self.take(count * struct.calcsize(_GGUF_SCALARS[etype]))
            else:
                raise ValueError(f"unknown GGUF array element type {etype}")
            return f"<array of {count}>"
        raise ValueError(f"unknown GGUF value type {vtype}")


def gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a GGUF file's header in pure Python: the key/value metadata (arrays summarised as
    "<array of N>") plus "gguf.version", "gguf.tensor_count", "gguf.data_end". Raises EngineError
    with a one-line reason when the file is missing, not GGUF, or truncated."""
    path = Path(path)
    if not path.is_file():
        raise EngineError(f"model file not found: {path}")
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if key in _GGUF_SEEN:  # a load checks the file twice (runner, Engine): parsed once
                return dict(_GGUF_SEEN[key])
            if st.st_size < 24:
                raise EngineError(f"{path} is not a GGUF model (file is only {st.st_size} bytes)")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                meta = _parse_gguf(path, _GGUFReader(buf))
    except OSError as exc:
        raise EngineError(f"cannot read {path}: {exc.strerror or exc}") from exc
    _GGUF_SEEN[key] = meta
    return dict(meta)


_GGUF_SEEN: dict[tuple, dict[str, Any]] = {}  # (device, inode, size, mtime) -> the parsed header


def _parse_gguf(path: Path, r: _GGUFReader) -> dict[str, Any]:
    if bytes(r.buf[:4]) != GGUF_MAGIC:
        raise EngineError(f"{path} is not a GGUF model (bad magic {bytes(r.buf[:4])!r})")
    r.take(4)
    version = r.scalar("<I")
    if version not in (2, 3):  # v1 is rejected by llama.cpp too; anything else is not a GGUF we know
        raise EngineError(f"{path}: unsupported GGUF version {version}")
    try:
        n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
        # Each KV / tensor entry takes at least 8 bytes: more than fit means a cut-off file (the
        # usual case: an interrupted download) or bogus counts.
        if n_tensors > r.size // 8 or n_kv > r.size // 8:
            raise EngineError(f"{path}: truncated or corrupt GGUF file (its header declares {n_kv} keys and "
                              f"{n_tensors} tensors, more than {r.size} bytes can hold)")
        meta: dict[str, Any] = {"gguf.version": version, "gguf.tensor_count": n_tensors}
        for _ in range(n_kv):
            key = r.string().decode("utf-8", "replace")
            meta[key] = r.value(r.scalar("<I"), keep=True)
        data_extent = 0
        for _ in range(n_tensors):
            r.skip_string()
            n_dims = r.scalar("<I")
            if n_dims > 4:  # GGML_MAX_DIMS
                raise EngineError(f"{path}: corrupt GGUF tensor info ({n_dims} dimensions)")
            n_elems = math.prod(r.scalar("<Q") for _ in range(n_dims))
            ttype, offset = r.scalar("<I"), r.scalar("<Q")
            block, type_size = _GGML_TYPE_SIZES.get(ttype, (1, 0))
            data_extent = max(data_extent, offset + n_elems // block * type_size)
    except _Truncated:
        raise EngineError(f"{path}: truncated GGUF file (header ends past {r.size} bytes)") from None
    except ValueError as exc:
        raise EngineError(f"{path}: corrupt GGUF header ({exc})") from None
    alignment = meta.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0:
        alignment = 32
    # With no tensors there is no (padded) data section at all.
    data_start = -(-r.pos // alignment) * alignment if n_tensors else r.pos
    meta["gguf.data_end"] = data_start + data_extent
    if data_start + data_extent > r.size:
        raise EngineError(
            f"{path}: truncated GGUF file ({r.size} bytes, tensor data needs {data_start + data_extent})"
        )
    return meta


def check_gguf(path: str | os.PathLike) -> None:
    """Validate a model file before llama.cpp touches it: it exists, is GGUF, its header and tensor
    table are complete, llama.cpp knows its architecture, and the hyperparameters llama.cpp
    asserts on are sane (`_check_hparams`). Raises a one-line EngineError."""
    meta = gguf_metadata(path)
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise EngineError(f"{path}: GGUF has no general.architecture, not a llama.cpp model")
    if arch == "clip":
        raise EngineError(f"{path} is a vision projector (architecture 'clip'), not a language model")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise EngineError(f"{path}: architecture '{arch}' is not supported by this llama.cpp build")
    if problem := _check_hparams(meta, arch):
        raise EngineError(f"{path}: corrupt model: {problem}")


# llama.cpp's LLAMA_MAX_LAYERS and LLAMA_MAX_EXPERTS (src/llama-hparams.h).
MAX_LAYERS = 512
MAX_EXPERTS = 512
# The values llama_rope_scaling_type_from_string knows (src/llama-model.cpp); any other string
# makes it return UNSPECIFIED, which load_hparams asserts against.
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")
_INT32_MAX = 2**31 - 1


def _check_hparams(meta: dict[str, Any], arch: str) -> str | None:
    """The first hyperparameter that would make llama.cpp abort the process (a GGML_ASSERT in
    llama_model's load_hparams: block, expert and rope scaling values) or that it misreads (a
    context length of 0 or past INT32_MAX, read back as -1), as "key = value (why)"; else None.
    KV head counts that cannot divide the head count are named here too (llama.cpp only says
    that a tensor has the wrong shape). Only scalar values are checked (the header parser
    summarises arrays); a missing required key or a wrong type makes llama.cpp fail cleanly."""

    def uint(key: str, default: int | None = None) -> int | None:
        """The key's integer value; `default` when it is absent; None when it is something else
        (a per-layer array: not checked here)."""
        value = meta.get(f"{arch}.{key}", default)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def bad(key: str, why: str) -> str:
        return f"{arch}.{key} = {meta.get(f'{arch}.{key}', 0)!r} ({why})"

    n_ctx_train = uint("context_length")
    if n_ctx_train is not None and not 0 < n_ctx_train <= _INT32_MAX:
        return bad("context_length", f"must be in 1..{_INT32_MAX}")
    n_layer = uint("block_count")
    if n_layer is not None and not 0 < n_layer <= MAX_LAYERS:
        return bad("block_count", f"must be in 1..{MAX_LAYERS}")
    n_embd = uint("embedding_length")
    if n_embd is not None and n_embd <= 0:
        return bad("embedding_length", "must be positive")
    n_expert, n_used = uint("expert_count", 0), uint("expert_used_count", 0)
    groups, groups_used = uint("expert_group_count", 0), uint("expert_group_used_count", 0)
    if n_expert is not None and n_expert > MAX_EXPERTS:
        return bad("expert_count", f"at most {MAX_EXPERTS}")
    if None in (n_expert, n_used, groups, groups_used):
        pass  # per-layer arrays: left to llama.cpp
    elif n_used > n_expert:
        return bad("expert_used_count", f"more than expert_count {n_expert}")
    elif n_expert > 0:
        if n_used == 0:
            return bad("expert_used_count", f"must be positive with expert_count {n_expert}")
        if groups >= n_expert:
            return bad("expert_group_count", f"must be less than expert_count {n_expert}")
        if groups > 1 and (n_expert % groups or not 0 < groups_used < groups):
            return bad("expert_group_count", "must divide expert_count, with 0 < expert_group_used_count < it")
    elif groups:
        return bad("expert_group_count", "set without experts")
    n_head, n_head_kv = uint("attention.head_count"), uint("attention.head_count_kv")
    if n_head is not None and n_head_kv is not None and n_head > 0 and (n_head_kv == 0 or n_head % n_head_kv):
        return bad("attention.head_count_kv", f"must divide attention.head_count {n_head}")
    rope = meta.get(f"{arch}.rope.scaling.type")
    if isinstance(rope, str) and rope not in ROPE_SCALING_TYPES:
        return f"{arch}.rope.scaling.type = {rope!r} (one of {', '.join(ROPE_SCALING_TYPES)})"
    return None


# ---------------------------------------------------------------------------------------------
# 2. Loading the bindings, llama.cpp's log
# ---------------------------------------------------------------------------------------------

_ll: ModuleType | None = None
_log_verbose = False
_log_errors: collections.deque[str] = collections.deque(maxlen=4)  # recent ERROR lines, for messages
_log_callback: Any = None  # the ctypes callback object; must stay referenced while installed
# What the loader did about the OpenMP wait policy: the variables it set, and whether libgomp was
# already in the process (then nothing set now can reach it).
_wait_applied: dict[str, str] = {}
_gomp_preloaded = False

# enum ggml_log_level in the vendored ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5.
# (llama_cpp/_logger.py's comment still shows the older order, with ERROR = 3.)
_GGML_LOG_ERROR, _GGML_LOG_CONT = 4, 5
_log_last_level = 0


def _on_log(level: int, text: bytes | None, _user_data: Any) -> None:
    # Called from C: an exception escaping here would be printed and swallowed, so never raise.
    global _log_last_level
    try:
        msg = text.decode("utf-8", "replace") if text else ""
        if level == _GGML_LOG_CONT:
            level = _log_last_level
            if level == _GGML_LOG_ERROR and _log_errors:
                _log_errors[-1] = (_log_errors[-1] + " " + msg.strip()).strip()
        elif level == _GGML_LOG_ERROR and msg.strip():
            _log_errors.append(msg.strip())
        _log_last_level = level
        if _log_verbose:
            sys.stderr.write(msg)
    except BaseException:  # noqa: BLE001
        pass


@contextmanager
def _signals_held():
    """Hold SIGINT/SIGTERM while llama.cpp loads a model and creates a context, then deliver them.

    Loading calls back into Python (log lines, progress), and a KeyboardInterrupt raised inside
    a ctypes callback is printed and swallowed: Ctrl-C during a load was lost and the whole run
    went on. Here the signal is only recorded; the function this yields (polled by the load's
    progress callback) says to cancel the load when the signal's own handler would end the run
    anyway, and on the way out the signal goes to the handler that was installed before."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False  # signal handlers belong to the main thread; nothing to hold here
        return
    held: list[int] = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    ends_run = (signal.default_int_handler, signal.SIG_DFL, None)  # None: set outside Python (default)
    for s in previous:
        signal.signal(s, lambda signum, _frame: held.append(signum))
    def cancelled() -> bool:
        return bool(held) and previous[held[0]] in ends_run

    # The caller handles the signal itself (it stopped cleanly): it is not delivered on the way out.
    cancelled.take = lambda: held.pop(0)  # type: ignore[attr-defined]
    try:
        yield cancelled
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        if held:
            handler = previous[held[0]]
            if callable(handler):
                handler(held[0], None)  # KeyboardInterrupt, or a run's own stop flag (SignalStop)
            elif handler != signal.SIG_IGN:
                signal.raise_signal(held[0])  # the default action: SIGTERM ends the process


def _gomp_loaded() -> bool:
    """Whether libgomp is mapped into this process already (Linux; False where unknown)."""
    try:
        with open("/proc/self/maps", "rb") as maps:
            return b"libgomp" in maps.read()
    except OSError:
        return False


def _bindings(name: str) -> ModuleType:
    """`llama_cpp.<name>` without running llama_cpp/__init__.py when the package is not loaded yet:
    that file imports the high-level `Llama` (numpy, jinja2, its chat formats), most of a cold
    start, and kgen uses none of it. The package stands in as a bare module while the submodule
    loads and is removed again, so a later `import llama_cpp` still runs the real __init__ (which
    finds the submodules already loaded)."""
    full = f"llama_cpp.{name}"
    if "llama_cpp" in sys.modules or full in sys.modules:
        return importlib.import_module(full)
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("No module named 'llama_cpp'")
    stand_in = types.ModuleType("llama_cpp")
    stand_in.__spec__, stand_in.__path__ = spec, list(spec.submodule_search_locations)
    sys.modules["llama_cpp"] = stand_in
    try:
        return importlib.import_module(full)
    finally:
        if sys.modules.get("llama_cpp") is stand_in:
            del sys.modules["llama_cpp"]


def _llama() -> ModuleType:
    """Import the bindings once, route llama.cpp's log through `_on_log`, init the backend.

    libgomp reads its wait policy when it is loaded, with libllama: kgen's (threads.spin_env)
    goes into os.environ first, unless the user set one."""
    global _ll, _log_callback, _gomp_preloaded
    if _ll is None:
        if not _wait_applied:
            _gomp_preloaded = _gomp_loaded()
            _wait_applied.update(_threads.spin_env(os.environ))
            os.environ.update(_wait_applied)
        try:
            ll = _bindings("llama_cpp")
        except (ImportError, OSError) as exc:
            raise EngineError(
                f"llama-cpp-python could not be loaded: {exc}", hint="pip install llama-cpp-python==0.3.36"
            ) from exc
        _log_callback = ll.llama_log_callback(_on_log)
        ll.llama_log_set(_log_callback, None)
        ll.llama_backend_init()
        _ll = ll
    return _ll


def set_verbose(verbose: bool) -> None:
    """Show llama.cpp's log on stderr (True) or keep it silent (False). Process-wide. Installs
    `_on_log` again: a later `import llama_cpp` (llama_cpp/_logger.py) replaces it."""
    global _log_verbose
    _log_verbose = bool(verbose)
    if _ll is not None:
        _ll.llama_log_set(_log_callback, None)


def _last_error(default: str = "see --llama-log (or -vv) for llama.cpp's log") -> str:
    return _log_errors[-1] if _log_errors else default


def _load_error() -> str:
    """Why llama_model_load_from_file failed: its last ERROR line only says "failed to load model";
    the reason (missing key, bad tensor...) is the "error loading model: ..." line before it."""
    for line in _log_errors:
        if "error loading model: " in line:
            return line.split("error loading model: ", 1)[1]
    return _last_error()


def _cstr(fn: Callable[..., int], *args: Any, size: int = 256) -> str:
    """Call a llama.cpp `(…, char * buf, size_t size) -> int` function; grow the buffer if needed."""
    for _ in range(2):
        buf = ctypes.create_string_buffer(size)
        n = fn(*args, buf, size)
        if n < 0:
            return ""
        if n < size:
            return buf.value.decode("utf-8", "replace")
        size = n + 1
    return buf.value.decode("utf-8", "replace")


# ---------------------------------------------------------------------------------------------
# 3. `kgen info` helpers, quantization
# ---------------------------------------------------------------------------------------------


def llama_version() -> str:
    """llama.cpp's version string as compiled into libllama (e.g. "0.5.0-dev")."""
    return _llama().llama_version().decode()


def bindings_version() -> str:
    """The llama-cpp-python version (e.g. "0.3.36")."""
    import importlib.metadata

    _llama()
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:  # not installed as a distribution: ask the package
        return str(importlib.import_module("llama_cpp").__version__)


def system_info() -> str:
    """llama.cpp's one-line CPU/backend feature summary."""
    return _llama().llama_print_system_info().decode("utf-8", "replace").strip()


def gpu_offload_supported() -> bool:
    return bool(_llama().llama_supports_gpu_offload())


_DEV_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}


def devices() -> list[dict]:
    """ggml backend devices: name, description, type, memory_free / memory_total (bytes)."""
    _llama()
    g = _bindings("_ggml").libggml  # llama-cpp-python binds none of these; declare them

    vp, sz = ctypes.c_void_p, ctypes.c_size_t
    for name, argtypes, restype in [
        ("ggml_backend_dev_count", [], sz),
        ("ggml_backend_dev_get", [sz], vp),
        ("ggml_backend_dev_name", [vp], ctypes.c_char_p),
        ("ggml_backend_dev_description", [vp], ctypes.c_char_p),
        ("ggml_backend_dev_type", [vp], ctypes.c_int),
        ("ggml_backend_dev_memory", [vp, ctypes.POINTER(sz), ctypes.POINTER(sz)], None),
    ]:
        fn = getattr(g, name)
        fn.argtypes, fn.restype = argtypes, restype
    out = []
    for i in range(g.ggml_backend_dev_count()):
        dev = g.ggml_backend_dev_get(i)
        free, total = sz(0), sz(0)
        g.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        out.append(
            {
                "name": (g.ggml_backend_dev_name(dev) or b"").decode("utf-8", "replace"),
                "description": (g.ggml_backend_dev_description(dev) or b"").decode("utf-8", "replace"),
                "type": _DEV_TYPES.get(g.ggml_backend_dev_type(dev), "unknown"),
                "memory_free": free.value,
                "memory_total": total.value,
            }
        )
    return out




def _ftype(ll: ModuleType | None, qtype: str) -> int:
    name = qtype.strip().upper()
    if name not in QUANT_TYPES:
        raise UsageError(f"unknown quantization type {qtype!r} (choose from {', '.join(QUANT_TYPES)})")
    return int(ll.LLAMA_FTYPE_ALL_F32 if name == "F32" else getattr(ll, f"LLAMA_FTYPE_MOSTLY_{name}"))


def quantize_model(
    src: Path, dst: Path, qtype: str, threads: int = 0, *, allow_requantize: bool = False
) -> None:
    """Quantize a GGUF with llama_model_quantize into `dst`, atomically (temp file + rename).

    `allow_requantize` permits an already-quantized source (quality loss; llama.cpp refuses by default).

    llama_model_quantize has no abort callback, and a KeyboardInterrupt raised in its log callback
    is swallowed (Ctrl-C used to print a traceback and let it finish), so it runs in a child
    process. SIGINT/SIGTERM are held meanwhile (`_signals_held`); one that would end the run kills
    the child, removes the partial file and raises EngineError with exit status 128 + signal.
    Temp files left by runs that were killed outright (SIGKILL) are removed first.
    """
    src, dst = Path(src), Path(dst)
    name = qtype.strip().upper()
    if name not in QUANT_TYPES:  # before any work
        _ftype(None, qtype)
    check_gguf(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    with ExitStack() as stack:
        stopping = stack.enter_context(_signals_held())
        stack.callback(tmp.unlink, missing_ok=True)  # runs before a held signal would be delivered
        try:
            reason = _run_quantize_child(src, tmp, name, threads, allow_requantize, stopping)
        except _QuantizeStopped:
            signum = stopping.take()
            error = EngineError(f"quantizing {src.name} to {name} was interrupted; the partial file was removed")
            error.exit_code = 128 + signum
            raise error from None
        if reason is not None:
            hint = "the source is already quantized; allow requantizing" if "requantiz" in reason else None
            raise EngineError(f"quantizing {src.name} to {name} failed: {reason}", hint=hint)
        check_gguf(tmp)
        os.replace(tmp, dst)


class _QuantizeStopped(Exception):
    pass


def _remove_stale_temps(dst: Path) -> None:
    """Remove `dst`'s temp files whose process is gone (killed mid-quantisation)."""
    for path in dst.parent.glob(f".{dst.name}.*.tmp"):
        pid = path.name[len(dst.name) + 2 : -len(".tmp")]
        if pid.isdigit() and not _process_alive(int(pid)):
            path.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, but is not ours
        return True
    return True


def _run_quantize_child(src: Path, tmp: Path, qtype: str, threads: int, allow_requantize: bool,
                        stopping: Callable[[], bool]) -> str | None:
    """Run `_quantize_child` in a new Python process; None on success, else llama.cpp's reason.
    Polls `stopping()` every 0.1 s: when true the child is killed and _QuantizeStopped raised.
    The child has its own session (a terminal's Ctrl-C reaches only this process, which then
    kills it) and dies with this process (PR_SET_PDEATHSIG on Linux)."""
    import subprocess
    import tempfile

    package_root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    code = "import sys; from kgen_cli.engine import _quantize_child; sys.exit(_quantize_child(sys.argv[1:]))"
    args = [os.fsdecode(src), os.fsdecode(tmp), qtype, str(max(0, int(threads))), str(int(allow_requantize)),
            str(int(_log_verbose)), str(os.getpid())]
    with tempfile.TemporaryFile() as out:  # a file, not a pipe: a chatty child can never block on it
        proc = subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.DEVNULL, stdout=out,
                                start_new_session=True, env=env)
        try:
            while True:
                try:
                    proc.wait(timeout=0.1)
                    break
                except subprocess.TimeoutExpired:
                    if stopping():
                        raise _QuantizeStopped from None
        finally:
            if proc.returncode is None:
                proc.kill()
                proc.wait()
        out.seek(0)
        lines = out.read().decode("utf-8", "replace").strip().splitlines()
    if proc.returncode == 0:
        return None
    return lines[-1] if lines else f"the quantizing process ended with status {proc.returncode}"


def _quantize_child(argv: list[str]) -> int:
    """The child of `_run_quantize_child`: quantize, print llama.cpp's reason on failure."""
    src, tmp, qtype, threads, allow_requantize, verbose, parent = argv
    if sys.platform.startswith("linux"):
        try:  # PR_SET_PDEATHSIG = 1: SIGKILL this process when its parent dies
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
        if os.getppid() != int(parent):  # the parent died before that
            return 1
    set_verbose(verbose == "1")
    ll = _llama()
    params = ll.llama_model_quantize_default_params()
    params.nthread = int(threads)
    params.ftype = _ftype(ll, qtype)
    params.allow_requantize = allow_requantize == "1"
    if ll.llama_model_quantize(os.fsencode(src), os.fsencode(tmp), ctypes.byref(params)) != 0:
        print(_last_error(), flush=True)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------
# 3b. Chat prompts (llama.cpp's built-in templates; a model's Jinja template is never evaluated)
# ---------------------------------------------------------------------------------------------


def chat_template_names() -> list[str]:
    """The names of llama.cpp's built-in chat templates (chatml, llama3, gemma, ...)."""
    ll = _llama()
    n = ll.llama_chat_builtin_templates(None, 0)
    names = (ctypes.c_char_p * max(n, 1))()
    n = ll.llama_chat_builtin_templates(names, n)
    return sorted(names[i].decode() for i in range(max(n, 0)))


def chat_template(model_path: str | os.PathLike, name: str | None = None) -> str:
    """The chat template a model's prompts are built with: the built-in template `name`, else the
    one llama.cpp recognises in the GGUF's `tokenizer.chat_template` (matched by llama.cpp's own
    heuristics, not run). Raises UsageError for an unknown name, EngineError when the model has no
    template llama.cpp knows. Returns a name or template text for `apply_chat_template`."""
    if name is not None:
        known = chat_template_names()
        if name not in known:
            raise UsageError(f"unknown chat template {name!r}; llama.cpp knows: {', '.join(known)}")
        return name
    text = gguf_metadata(model_path).get("tokenizer.chat_template")
    if not isinstance(text, str) or not text.strip():
        raise EngineError(f"{Path(model_path).name} has no chat template in its metadata",
                          hint="name one with --chat-template (e.g. chatml)")
    try:
        apply_chat_template(text, [("user", "x")])
    except EngineError:
        raise EngineError(f"{Path(model_path).name}: llama.cpp does not recognise its chat template",
                          hint="name a built-in one with --chat-template (e.g. chatml)") from None
    return text


def apply_chat_template(template: str, messages: Sequence[tuple[str, str]], *, add_assistant: bool = True) -> str:
    """`messages` ((role, content), ...) as prompt text, with llama_chat_apply_template; ends with
    the assistant's turn opened when `add_assistant`."""
    ll = _llama()
    encoded = [(role.encode("utf-8"), content.encode("utf-8")) for role, content in messages]
    chat = (ll.llama_chat_message * len(encoded))(*[ll.llama_chat_message(r, c) for r, c in encoded])
    size = 256 + sum(len(r) + len(c) for r, c in encoded) * 2
    for _ in range(2):
        buf = ctypes.create_string_buffer(size)
        n = ll.llama_chat_apply_template(template.encode("utf-8"), chat, len(encoded), add_assistant, buf, size)
        if n < 0:
            raise EngineError("llama.cpp does not recognise this chat template")
        if n <= size:
            return buf.raw[:n].decode("utf-8", "replace")
        size = n + 1
    raise EngineError("llama_chat_apply_template kept growing")


# ---------------------------------------------------------------------------------------------
# 4. Sampler chains
# ---------------------------------------------------------------------------------------------

_live_samplers = 0  # native chains created and not yet freed (tests check it returns to zero)


def live_sampler_count() -> int:
    return _live_samplers


def sampler_chain(params: SamplingParams, seed: int, *, n_vocab: int = 0) -> Any:
    """Build the C chain penalties -> top_k -> top_p -> min_p -> temp -> dist(seed) (stages that
    are disabled are left out; temperature <= 0 is greedy). Returns the raw `llama_sampler *`;
    the caller frees it with `free_sampler_chain`. The chain owns the samplers added to it."""
    global _live_samplers
    ll = _llama()
    validate_params(params, seed)
    chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
    if not chain:
        raise EngineError("llama.cpp could not create a sampler chain")
    _live_samplers += 1

    def add(stage: Any) -> None:
        ll.llama_sampler_chain_add(chain, stage)  # the chain now owns (and will free) the stage

    if params.repeat_penalty != 1.0:
        # Only generated tokens enter the penalty window, as in Llama.create_completion.
        add(ll.llama_sampler_init_penalties(n_vocab, params.penalty_last_n, params.repeat_penalty, 0.0, 0.0))
    if params.temperature <= 0.0:
        add(ll.llama_sampler_init_greedy())
        return chain
    if params.top_k > 0:
        add(ll.llama_sampler_init_top_k(params.top_k))
    if params.top_p < 1.0:
        add(ll.llama_sampler_init_top_p(params.top_p, 1))
    if params.min_p > 0.0:
        add(ll.llama_sampler_init_min_p(params.min_p, 1))
    add(ll.llama_sampler_init_temp(params.temperature))
    add(ll.llama_sampler_init_dist(seed))
    return chain


def free_sampler_chain(chain: Any) -> None:
    global _live_samplers
    if chain:
        _llama().llama_sampler_free(chain)
        _live_samplers -= 1


class Sampler:
    """One C sampler chain (its own RNG and penalty history). Free it with `free()`."""

    def __init__(self, params: SamplingParams, seed: int, *, n_vocab: int = 0, owner: BranchDecoder | None = None):
        self.params, self.seed = params, seed
        self._handle = sampler_chain(params, seed, n_vocab=n_vocab)
        self._owner = owner  # frees us at its close() if we are still alive then

    @property
    def handle(self) -> Any:
        if not self._handle:
            raise EngineError("sampler used after free()")
        return self._handle

    @property
    def closed(self) -> bool:
        return not self._handle

    def free(self) -> None:
        """Release the native chain. Idempotent."""
        handle, self._handle = self._handle, None
        free_sampler_chain(handle)
        if self._owner is not None:
            self._owner._samplers.discard(self)
            self._owner = None


# ---------------------------------------------------------------------------------------------
# 5. Engine
# ---------------------------------------------------------------------------------------------


def _set_fields(struct: Any, **values: Any) -> Any:
    """Set ctypes struct fields by name, refusing names the struct does not have (assigning one
    would silently create a Python attribute that C never sees; docs/design.md#llama-cpp-traps)."""
    known = {f[0] for f in type(struct)._fields_}
    for name, value in values.items():
        if name not in known:
            raise EngineError(f"llama-cpp-python's {type(struct).__name__} has no field {name!r}")
        setattr(struct, name, value)
    return struct


def cpu_has_amx() -> bool:
    """Whether ggml's CPU backend reports AMX (and would use its AMX weight buffers)."""
    return "AMX_INT8 = 1" in system_info()


def thread_policy(n_threads: int | None = None) -> _threads.ThreadPolicy:
    """The thread count an Engine opened now would start with, and the OpenMP wait policy in
    effect for this process (loads the bindings, so that the policy is the one they got)."""
    _llama()
    policy = _threads.choose(n_threads)
    if _gomp_preloaded:
        policy.wait_source = "libgomp loaded before kgen could set it"
    elif not _wait_applied:
        policy.wait_source = "environment" if policy.wait else "libgomp default"
    return policy


@dataclass
class DecodeCounters:
    """Work done through this Engine: every llama_decode call and every token submitted to one."""

    decode_calls: int = 0
    tokens: int = 0


class Engine:
    """A loaded model with one llama.cpp context (up to `n_seq_max` sequences; unified KV by default)."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        n_ctx: int = 4096,
        n_gpu_layers: int = 0,
        n_threads: int | None = None,
        n_seq_max: int = 1,
        verbose: bool = False,
        extra_buffers: bool | None = None,
        flash_attn: bool | None = None,
        kv_unified: bool = True,
    ):
        """`kv_unified=False` gives each sequence its own KV stream of n_ctx / n_seq_max cells:
        attention then reads only the sequence's own cells (with one shared buffer every token
        reads every used cell, masked), which is much faster for many long, unrelated sequences
        (kgen batch), but forks copy whole streams and partial copies do not exist (the tree
        needs the unified cache)."""
        if isinstance(n_seq_max, bool) or not isinstance(n_seq_max, int) or not 1 <= n_seq_max <= MAX_SEQUENCES:
            # llama.cpp returns NULL for > 256; validating gives the user the reason.
            raise UsageError(f"n_seq_max must be in [1, {MAX_SEQUENCES}], got {n_seq_max!r}")
        if not isinstance(n_ctx, int) or not 0 <= n_ctx <= MAX_N_CTX:
            # A uint32 in C: larger values wrap (a GGML_ASSERT abort, or a huge allocation).
            raise UsageError(f"n_ctx must be in [0, {MAX_N_CTX}] (0 = the model's training context), got {n_ctx!r}")
        if n_threads is not None and n_threads < 1:
            raise UsageError(f"n_threads must be >= 1, got {n_threads!r}")
        self.path = Path(model_path)
        check_gguf(self.path)
        ll = self._ll = _llama()
        set_verbose(verbose)
        self._stack = ExitStack()  # unwinds in reverse: batch, then context, then model
        self._branches: BranchDecoder | None = None
        self._pieces: list[bytes] | None = None
        self._token_info: dict[int, tuple[bytes, bool, int]] = {}
        self._separators: frozenset[int] | None = None
        self.counters = DecodeCounters()
        _log_errors.clear()
        try:
            with _signals_held() as stop_requested:
                if extra_buffers is None:
                    extra_buffers = not cpu_has_amx()
                mp = _set_fields(
                    ll.llama_model_default_params(),
                    n_gpu_layers=int(n_gpu_layers),
                    load_mode=ll.LLAMA_LOAD_MODE_MMAP,
                    # Extra buffer types = CPU weight repacking, including ggml's AMX path, which
                    # segfaults on multi-token batches on AMX CPUs (seen on a Xeon VM); auto = off there.
                    use_extra_bufts=bool(extra_buffers),
                )
                # Polled per tensor; False cancels the load (a held Ctrl-C, see _signals_held).
                # Also replaces llama.cpp's default callback, which logs a row of dots.
                on_progress = ll.llama_progress_callback(lambda _progress, _data: not stop_requested())
                _set_fields(mp, progress_callback=on_progress)
                model = ll.llama_model_load_from_file(os.fsencode(self.path), mp)
                del on_progress  # C keeps no reference once the load returns
                if not model:
                    raise EngineError(f"llama.cpp could not load {self.path}: {_load_error()}")
                self._stack.callback(ll.llama_model_free, model)
                self._model = model
                self._vocab = ll.llama_model_get_vocab(model)
                self.n_vocab: int = ll.llama_vocab_n_tokens(self._vocab)
                n_ctx_train = ll.llama_model_n_ctx_train(model)

                want = n_ctx or n_ctx_train
                want = -(-want // _CTX_PAD) * _CTX_PAD
                policy = thread_policy(n_threads)
                threads = policy.threads
                cp = _set_fields(
                    ll.llama_context_default_params(),
                    n_ctx=want,
                    n_batch=want,  # one step never needs Python chunking; llama_decode splits into ubatches
                    n_ubatch=min(512, want),
                    n_seq_max=n_seq_max,
                    kv_unified=bool(kv_unified),  # forks share prompt cells; partial seq_cp needs it (docs/design.md#kv-budget)
                    n_threads=threads,
                    n_threads_batch=threads,
                    no_perf=True,  # llama.cpp's token counters still run; only its timers are off
                    flash_attn_type=-1 if flash_attn is None else int(bool(flash_attn)),  # -1 = auto
                )
                ctx = ll.llama_init_from_model(model, cp)
                if not ctx:
                    raise EngineError(f"llama.cpp could not create a context (n_ctx={want}): {_last_error()}")
                self._stack.callback(ll.llama_free, ctx)
                self._ctx = ctx
                self._mem = ll.llama_get_memory(ctx)
                self.n_ctx: int = ll.llama_n_ctx(ctx)
                self.kv_unified = bool(kv_unified)
                # Cells one sequence can hold: all of them when unified, its stream's otherwise.
                self.n_ctx_seq: int = ll.llama_n_ctx_seq(ctx) if not kv_unified else self.n_ctx
                # The most positions one model call spans (prompt + new tokens). The context holds
                # many sequences; kgen's runner narrows this to the model's trained context.
                self.window: int = self.n_ctx_seq
                self.n_batch: int = ll.llama_n_batch(ctx)
                self.n_seq_max: int = ll.llama_n_seq_max(ctx)
                self.n_threads = threads
                self.thread_policy = policy
                # Without --threads the count follows the machine's load between decodes.
                self._governor = (
                    _threads.ThreadGovernor(policy.cpus.usable, threads) if policy.adaptive else None
                )
                # One token belongs to one sequence: prompts are shared by llama_memory_seq_cp, not by
                # tagging tokens with several ids.
                self._batch = ll.llama_batch_init(self.n_batch, 0, 1)
                self._stack.callback(ll.llama_batch_free, self._batch)
        except BaseException:
            self._stack.close()
            raise

        self._add_bos = bool(ll.llama_vocab_get_add_bos(self._vocab))
        self._bos = ll.llama_vocab_bos(self._vocab)
        self.model_info: dict[str, Any] = {
            "path": str(self.path),
            "architecture": _cstr(ll.llama_model_meta_val_str, model, b"general.architecture"),
            "name": _cstr(ll.llama_model_meta_val_str, model, b"general.name"),
            "desc": _cstr(ll.llama_model_desc, model),
            "n_params": int(ll.llama_model_n_params(model)),
            "size": int(ll.llama_model_size(model)),
            "file_size": self.path.stat().st_size,
            "n_vocab": self.n_vocab,
            "n_ctx_train": int(n_ctx_train),
            "n_embd": int(ll.llama_model_n_embd(model)),
            "n_layer": int(ll.llama_model_n_layer(model)),
            "add_bos": self._add_bos,
            "n_ctx": self.n_ctx,
            "kv_unified": self.kv_unified,
            "n_seq_max": self.n_seq_max,
            "n_threads": threads,
            "thread_policy": policy.to_dict(),
            "n_gpu_layers": int(n_gpu_layers),
            "extra_buffers": bool(extra_buffers),
        }

    # -- lifetime ---------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._stack is None

    def close(self) -> None:
        """Free samplers and sequences, then batch, context and model. Idempotent."""
        if self._stack is None:
            return
        if self._branches is not None:
            self._branches.close()
        stack, self._stack = self._stack, None
        stack.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._stack is None:
            raise EngineError("the engine is closed")

    # -- vocabulary -------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Tokens of `text`, special tokens parsed, with BOS first when the GGUF asks for it.

        Same tokens as Llama.create_completion's `tokenize(add_bos=True, special=True)`, except
        that an add-EOS flag never appends EOS to a prompt (BOS is prepended here, not by
        llama_tokenize's add_special, which would also add EOS)."""
        self._check_open()
        ll = self._ll
        data = text.encode("utf-8")
        cap = len(data) + 8
        for _ in range(2):
            buf = (ll.llama_token * cap)()
            n = ll.llama_tokenize(self._vocab, data, len(data), buf, cap, False, True)
            if n >= 0:
                break
            cap = -n  # buffer too small: -n is the size needed
        else:
            raise EngineError("llama_tokenize failed")
        tokens = list(buf[:n])
        if add_bos and self._add_bos and self._bos >= 0:
            tokens.insert(0, self._bos)
        return tokens

    def _piece_uncached(self, token: int, buf: ctypes.Array) -> bytes:
        n = self._ll.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._ll.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    @property
    def pieces(self) -> list[bytes]:
        """Every token's bytes as rendered in generated text (special tokens render as b"")."""
        if self._pieces is None:
            self._check_open()
            buf = ctypes.create_string_buffer(128)
            self._pieces = [self._piece_uncached(t, buf) for t in range(self.n_vocab)]
        return self._pieces

    def token_info(self, token: int) -> tuple[bytes, bool, int]:
        """(piece, is end of generation, number of ",") of a sampled token, cached per token:
        the per-token path of sampling, without building the whole-vocabulary `pieces` table
        (49k llama_token_to_piece calls) in every process."""
        info = self._token_info.get(token)
        if info is None:
            piece = self._pieces[token] if self._pieces is not None else self._piece_uncached(
                token, ctypes.create_string_buffer(128))
            info = self._token_info[token] = (piece, self.is_eog(token), piece.count(b","))
        return info

    def piece(self, token: int) -> bytes:
        if not 0 <= token < self.n_vocab:
            raise EngineError(f"token {token} is outside the vocabulary (0..{self.n_vocab - 1})")
        return self.pieces[token]

    def is_eog(self, token: int) -> bool:
        return bool(self._ll.llama_vocab_is_eog(self._vocab, token))

    @property
    def separator_tokens(self) -> frozenset[int]:
        """Every token whose text contains "," (derived from this vocabulary)."""
        if self._separators is None:
            self._separators = frozenset(t for t, p in enumerate(self.pieces) if b"," in p)
        return self._separators

    def detokenize(self, tokens: Iterable[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", "replace")

    # -- branches ---------------------------------------------------------------------------

    def branches(self) -> BranchDecoder:
        """The context's BranchDecoder. There is one per engine (its KV sequences all live in the
        one context): created on first use, returned again by later calls, made afresh after its
        `close()`."""
        self._check_open()
        if self._branches is None:
            self._branches = BranchDecoder(self)
        return self._branches


# ---------------------------------------------------------------------------------------------
# 6. BranchDecoder
# ---------------------------------------------------------------------------------------------


class BranchDecoder:
    """Many KV sequences in one Engine's context, with ids from a bounded pool 0..n_seq_max-1:
    the llama.cpp implementation of the `kgen_cli.decoding.BranchDecoder` protocol. One per Engine
    (`Engine.branches()`); `scheduler.Scheduler` and the samplers of `tree` drive it.

    Every method validates ids, lengths and batch indices in Python first, because the matching
    llama.cpp mistakes abort the process (docs/design.md#llama-cpp-traps). Logits live only until the next
    `step`: `sample` works on a sequence whose last fed token got its row in the latest step (or a
    fork taken at such a sequence's tip)."""

    def __init__(self, engine: Engine):
        self._engine = engine
        self._ll = engine._ll
        self.max_branches: int = engine.n_seq_max
        self._free_ids = set(range(self.max_branches))
        self._len: dict[int, int] = {}  # live seq -> number of positions in the KV cache
        self._logits_at: dict[int, int] = {}  # seq -> batch index of its logits row in the last decode
        self._samplers: set[Sampler] = set()  # made by new_sampler and not freed yet
        self._softmax_buf: Any = None  # float32[n_vocab] scratch for token probabilities
        self._closed = False
        # Start from an empty cache (metadata only; the buffers need no clearing).
        self._ll.llama_memory_clear(engine._mem, False)

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Free every sequence and every sampler made by `new_sampler`. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for s in list(self._samplers):
            s.free()
        if not self._engine.closed:
            # Drops every sequence's cells at once (metadata only), so nothing outlives the decoder.
            self._ll.llama_memory_clear(self._engine._mem, False)
        self._len.clear()
        self._logits_at.clear()
        self._free_ids = set(range(self.max_branches))
        if self._engine._branches is self:
            self._engine._branches = None

    def __enter__(self) -> BranchDecoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sequences --------------------------------------------------------------------------

    @property
    def live(self) -> list[int]:
        return sorted(self._len)

    @property
    def n_free(self) -> int:
        return len(self._free_ids)

    def _check(self, seq: object) -> int:
        if self._closed:
            raise EngineError("the BranchDecoder is closed")
        if isinstance(seq, bool) or not isinstance(seq, int) or seq not in self._len:
            raise EngineError(f"sequence {seq!r} is not a live branch")
        return seq

    def open(self) -> int:
        """A fresh, empty sequence (the lowest free id, so runs are reproducible); feed it with
        `step`, e.g. a prompt decoded in the same llama_decode as other sequences' tokens."""
        if self._closed:
            raise EngineError("the BranchDecoder is closed")
        if not self._free_ids:
            raise BranchPoolExhausted(f"all {self.max_branches} sequences are in use")
        seq = min(self._free_ids)
        self._free_ids.remove(seq)
        self._len[seq] = 0
        return seq

    def start(self, tokens: list[int]) -> int:
        """Allocate a sequence and decode `tokens` on it (the last one gets logits)."""
        if not tokens:
            raise EngineError("start() needs at least one token")
        seq = self.open()
        try:
            self.step({seq: tokens})
        except BaseException:
            self.free(seq)
            raise
        return seq

    def fork(self, parent: int, keep: int) -> int:
        """A new sequence holding the first `keep` positions of `parent` (shared cells, no copy).

        Forking at the parent's tip (`keep == length(parent)`) also shares its pending logits, so
        the child can be sampled right away; `keep == 0` gives an empty sequence to feed with
        `step` (e.g. a new prompt that rides along with other sequences' tokens)."""
        self._check(parent)
        if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep <= self._len[parent]:
            raise EngineError(f"fork keep={keep!r} is outside 0..{self._len[parent]} (length of seq {parent})")
        child = self.open()
        mem = self._engine._mem
        if keep > 0 and self._engine.kv_unified:
            self._ll.llama_memory_seq_cp(mem, parent, child, 0, keep)  # shared cells, metadata only
        elif keep > 0:
            # Separate streams: only a whole-stream copy exists (a partial one aborts the
            # process); it is queued for the next decode. Then drop what is past `keep`.
            self._ll.llama_memory_seq_cp(mem, parent, child, -1, -1)
            if keep < self._len[parent]:
                self._ll.llama_memory_seq_rm(mem, child, keep, -1)
        self._len[child] = keep
        if keep == self._len[parent] and parent in self._logits_at:
            self._logits_at[child] = self._logits_at[parent]
        return child

    def free(self, seq: int) -> None:
        """Drop the sequence's cells (cells shared with others stay) and return its id to the pool."""
        self._check(seq)
        self._ll.llama_memory_seq_rm(self._engine._mem, seq, -1, -1)
        del self._len[seq]
        self._logits_at.pop(seq, None)
        self._free_ids.add(seq)

    def truncate(self, seq: int, keep: int) -> None:
        """Keep the sequence's first `keep` positions and drop the rest (its logits with them), so
        a later call whose prompt starts the same way decodes only what differs."""
        self._check(seq)
        if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep <= self._len[seq]:
            raise EngineError(f"truncate keep={keep!r} is outside 0..{self._len[seq]} (length of seq {seq})")
        if keep == self._len[seq]:
            return
        self._ll.llama_memory_seq_rm(self._engine._mem, seq, keep, -1)
        self._len[seq] = keep
        self._logits_at.pop(seq, None)

    def length(self, seq: int) -> int:
        """Positions held by the sequence, as llama.cpp reports them (pos_max + 1)."""
        self._check(seq)
        return self._ll.llama_memory_seq_pos_max(self._engine._mem, seq) + 1

    def has_logits(self, seq: int) -> bool:
        return seq in self._logits_at

    # -- decoding ---------------------------------------------------------------------------

    def step(self, feeds: dict[int, list[int]]) -> None:
        """Append each sequence's tokens at its current length and run ONE llama_decode for all;
        the last token of each sequence gets a logits row."""
        if not feeds:
            return
        eng = self._engine
        n_total = 0
        for seq, tokens in feeds.items():
            self._check(seq)
            if not tokens:
                raise EngineError(f"step(): no tokens for sequence {seq}")
            if self._len[seq] + len(tokens) > eng.n_ctx_seq:
                raise EngineError(
                    f"sequence {seq} would hold {self._len[seq] + len(tokens)} tokens, it has room for {eng.n_ctx_seq}"
                )
            for t in tokens:
                if not 0 <= t < eng.n_vocab:
                    raise EngineError(f"token {t!r} is outside the vocabulary (0..{eng.n_vocab - 1})")
            n_total += len(tokens)
        if n_total > eng.n_batch:
            raise EngineError(f"step of {n_total} tokens exceeds the batch size {eng.n_batch}")

        batch = eng._batch
        tok, pos, n_seq_id, seq_id, want = batch.token, batch.pos, batch.n_seq_id, batch.seq_id, batch.logits
        rows: dict[int, int] = {}
        i = 0
        order = feeds.items()
        if not eng.kv_unified:
            # With a stream per sequence llama.cpp builds each micro-batch from sequences whose
            # ids rise by one in batch order (split_equal, sequential): unsorted ids would cost
            # one forward pass per break in that chain.
            order = sorted(order)
        for seq, tokens in order:
            p = self._len[seq]  # positions stay contiguous per sequence (a gap is rc -1)
            for t in tokens:
                tok[i], pos[i], n_seq_id[i], want[i] = t, p, 1, 0
                seq_id[i][0] = seq
                i += 1
                p += 1
            want[i - 1] = 1
            rows[seq] = i - 1
        batch.n_tokens = i

        if eng._governor is not None and (threads := eng._governor.poll()) is not None:
            self._ll.llama_set_n_threads(eng._ctx, threads, threads)
            eng.n_threads = threads
        rc = self._ll.llama_decode(eng._ctx, batch)
        eng.counters.decode_calls += 1
        # Every earlier logits row is gone now, whatever rc says.
        self._logits_at = {}
        if rc != 0:
            self._resync()
            raise EngineError(_decode_error(rc, n_total, eng.n_ctx))
        eng.counters.tokens += n_total
        for seq, tokens in feeds.items():
            self._len[seq] += len(tokens)
        self._logits_at = rows

    def _resync(self) -> None:
        """After a failed decode, trust llama.cpp's view of each sequence (rc 2 / < -1 keep the
        micro-batches that were processed)."""
        for seq in self._len:
            self._len[seq] = self._ll.llama_memory_seq_pos_max(self._engine._mem, seq) + 1

    # -- sampling ---------------------------------------------------------------------------

    def new_sampler(self, params: SamplingParams, seed: int, history: Sequence[int] = ()) -> Sampler:
        """A C sampler chain. `history`: tokens generated before this point on the same text (a
        tree branch continuing its parent's), accepted into the chain so that the repetition
        penalty sees them as a single chain would have."""
        if self._closed:
            raise EngineError("the BranchDecoder is closed")
        sampler = Sampler(params, seed, n_vocab=self._engine.n_vocab, owner=self)
        self._samplers.add(sampler)
        if history and params.repeat_penalty != 1.0 and params.penalty_last_n > 0:
            recent, n_vocab = list(history[-params.penalty_last_n :]), self._engine.n_vocab
            if not all(isinstance(t, int) and 0 <= t < n_vocab for t in recent):
                sampler.free()
                raise EngineError(f"history holds a token outside the vocabulary (0..{n_vocab - 1})")
            accept, handle = self._ll.llama_sampler_accept, sampler.handle
            for token in recent:
                accept(handle, token)
        return sampler

    def release_sampler(self, sampler: Sampler) -> None:
        """Same as `sampler.free()`."""
        sampler.free()

    def _row(self, seq: int) -> int:
        self._check(seq)
        row = self._logits_at.get(seq)
        if row is None:
            # llama_sampler_sample on a row without logits is a GGML_ASSERT abort.
            raise EngineError(f"sequence {seq} has no pending logits (feed it a token with step() first)")
        return row

    def sample_token(self, seq: int, sampler: Sampler) -> int:
        """Sample (and accept into the chain) the next token of `seq`; the fast path."""
        row = self._row(seq)
        return self._ll.llama_sampler_sample(sampler.handle, self._engine._ctx, row)

    def sample(self, seq: int, sampler: Sampler, *, with_prob: bool = True) -> Sampled:
        """Sample the next token; `with_prob=False` skips the O(n_vocab) softmax that only the
        tree's segment scores need (prob is then NaN)."""
        row = self._row(seq)
        eng = self._engine
        token = self._ll.llama_sampler_sample(sampler.handle, eng._ctx, row)
        piece, eog, separators = eng.token_info(token)
        prob = self._prob(row, token) if with_prob else math.nan
        return Sampled(token, prob, piece, eog, separators)

    def logits(self, seq: int) -> Any:
        """A numpy view of the sequence's raw logits row; overwritten by the next step (copy it)."""
        return self._logits_row(self._row(seq), seq)

    def _logits_row(self, row: int, seq: int) -> Any:
        import numpy as np

        ptr = self._ll.llama_get_logits_ith(self._engine._ctx, row)
        if not ptr:
            raise EngineError(f"llama.cpp has no logits for sequence {seq}")
        return np.ctypeslib.as_array(ptr, shape=(self._engine.n_vocab,))

    def _prob(self, row: int, token: int) -> float:
        """softmax(logits)[token] for one output row: one max, one exp into a reused float32
        buffer and one sum over the vocabulary (~50 us for 49k tokens), no temporaries."""
        import numpy as np

        logits = self._logits_row(row, -1)
        buf = self._softmax_buf
        if buf is None:
            buf = self._softmax_buf = np.empty(self._engine.n_vocab, dtype=np.float32)
        top = logits.max()
        np.subtract(logits, top, out=buf)
        np.exp(buf, out=buf)
        return math.exp(float(logits[token]) - float(top)) / float(buf.sum())


def _decode_error(rc: int, n_tokens: int, n_ctx: int) -> str:
    if rc == 1:
        return f"llama_decode: no KV cache slot for {n_tokens} tokens (context of {n_ctx} is full; raise n_ctx)"
    if rc == 2:
        return "llama_decode was aborted"
    if rc == -1:
        return f"llama_decode rejected the batch as invalid: {_last_error('no details')}"
    return f"llama_decode failed (rc {rc}): {_last_error()}"
