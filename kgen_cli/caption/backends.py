"""Where a caption job's model calls go: llama.cpp in this process, or an OpenAI-compatible server.

A chat job is a generator per image (or per tag to describe): it yields `ChatCall`s (messages
for an instruct model) and receives their text; its return value is the job's result.

- `LocalBackend`: every job's calls decode together in one llama.cpp context through the
  continuous-batching `Scheduler` (up to `parallel` sequences per decode step); a `ChatCall`
  becomes a prompt through llama.cpp's built-in chat template (`engine.apply_chat_template`).
- `OpenAIBackend`: `parallel` worker threads, each driving one job at a time over HTTP
  (`/chat/completions`), with a timeout, retries with exponential backoff on 429 and 5xx, and a
  check of the server and model names before the run.
- `TipoBackend`: no chat: expand requests (tags to prose) on the library's `Generator.batch`,
  batched the same way.

All report `on_result(key, value, error)` in the calling thread, as each job ends, and call
`check()` between steps: a stop request raised there ends the run (workers' late answers are
dropped, never written).
"""

from __future__ import annotations

import json
import queue
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable

from kgen_cli.errors import KgenError, StopRequested
from kgen_cli.sampling import CompletionRequest, SamplingParams

OnResult = Callable[[Hashable, Any, "BaseException | None"], None]


@dataclass(frozen=True)
class ChatCall:
    """One instruct-model call. `messages`: ((role, content), ...), where content is text or,
    for a vision model, a list of OpenAI content parts. `model`: the server model to ask
    (the vision model), None for the backend's own."""

    messages: tuple[tuple[str, Any], ...]
    seed: int
    params: SamplingParams
    model: str | None = None


def _guarded(job):
    """The job with unexpected exceptions turned into its own error (never the run's)."""
    try:
        return (yield from job)
    except (KgenError, StopRequested, GeneratorExit):
        raise
    except Exception as exc:
        from kgen_cli.console import debug_enabled

        if debug_enabled():
            raise
        raise KgenError(f"internal error: {type(exc).__name__}: {exc}") from exc


def _relay(job, ask):
    """Run `job`, each call it yields answered by the generator `ask(call)` (which may yield
    lower-level requests of its own); returns the job's result."""
    request = next(job)
    while True:
        answer = yield from ask(request)
        try:
            request = job.send(answer)
        except StopIteration as stop:
            return stop.value


# -- llama.cpp in process -------------------------------------------------------------------------


class _CheckedDecoder:
    """The decoder as the scheduler sees it, with `check()` before every decode step."""

    def __init__(self, decoder: Any, check: Callable[[], None] | None):
        self._decoder, self._check = decoder, check
        if not callable(getattr(decoder, "truncate", None)):
            self.truncate = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._decoder, name)

    def step(self, feeds: dict[int, list[int]]) -> None:
        if self._check is not None:
            self._check()
        self._decoder.step(feeds)


class LocalBackend:
    """Jobs on one llama.cpp engine, batched by the scheduler."""

    def __init__(self, engine: Any, *, model_name: str, parallel: int, chat_template: str | None = None,
                 share_prefix: int = 0):  # fmt: skip
        self.engine, self.model_name, self.parallel = engine, model_name, parallel
        self.chat_template, self.share_prefix = chat_template, share_prefix
        from kgen_cli.scheduler import SchedulerStats

        self.stats = SchedulerStats()  # summed over every run (descriptions, then captions)

    def close(self) -> None:
        self.engine.close()

    def prompt(self, call: ChatCall) -> str:
        from kgen_cli.engine import apply_chat_template

        if self.chat_template is None:
            raise KgenError("this model takes no chat prompts")
        for _, content in call.messages:
            if not isinstance(content, str):
                raise KgenError("a local model takes text only (images need --backend openai --vision-model)")
        return apply_chat_template(self.chat_template, call.messages)

    def _ask(self, call: ChatCall):
        """One chat call as the scheduler's request, answered with the text."""
        completion = yield CompletionRequest(self.prompt(call), call.seed, call.params)
        return completion.text

    def run(self, jobs: Iterable[tuple[Hashable, Any]], on_result: OnResult,
            check: Callable[[], None] | None = None) -> None:  # fmt: skip
        from kgen_cli.runner import tokenizer
        from kgen_cli.scheduler import Scheduler

        engine = self.engine
        scheduler = Scheduler(_CheckedDecoder(engine.branches(), check), tokenizer(engine), n_ctx=engine.n_ctx,
                              parallel=min(self.parallel, engine.n_seq_max), window=engine.window,
                              share_prefix=self.share_prefix if engine.kv_unified else 0)
        try:
            scheduler.run(((key, _relay(_guarded(job), self._ask)) for key, job in jobs), on_result)
        finally:
            for name, value in vars(scheduler.stats).items():
                setattr(self.stats, name, getattr(self.stats, name) + value)


class TipoBackend:
    """TIPO captions through the library: each request (a mapping of `kgen batch` JSONL fields:
    tags, seed, expand_tags, nl_length, aspect_ratio, format, temperature, max_tokens) is one
    expand of `Generator.batch`, all of them decoded together (continuous batching);
    `on_result` receives each one's ExpandResult as it finishes (finishing order, so that a stop
    loses no finished result)."""

    def __init__(self, generator: Any, *, parallel: int):
        from kgen_cli.batchjobs import BatchStats

        self.generator, self.parallel = generator, parallel
        self.model_name = generator.model.name
        self.stats = BatchStats()

    def close(self) -> None:
        self.generator.close()

    def expand(self, requests: Iterable[tuple[Hashable, dict]], on_result: OnResult,
               check: Callable[[], None] | None = None) -> None:  # fmt: skip
        from kgen_cli.batchio import record_from

        run, _ = self.generator.batch(parallel=self.parallel, seed=0, check=check)
        keys: dict[int, Hashable] = {}

        def records():
            for index, (key, request) in enumerate(requests):
                keys[index] = key
                yield record_from(index, {k: v for k, v in request.items() if v is not None})

        try:
            for rec, result, error in run.results(records()):
                on_result(keys.pop(rec.index), None if error is not None else result["variants"][0], error)
        finally:
            self.stats = run.stats


# -- an OpenAI-compatible server -----------------------------------------------------------------


class ServerError(KgenError):
    """The server failed one request (after its retries)."""


class OpenAIBackend:
    """Jobs over HTTP to an OpenAI-compatible `/chat/completions`, `parallel` at a time."""

    def __init__(self, base_url: str, api_model: str, *, api_key: str | None = None, parallel: int = 4,
                 timeout: float = 120.0, retries: int = 3, backoff: float = 1.0):  # fmt: skip
        self.base_url = base_url.rstrip("/")
        self.api_model, self.parallel = api_model, parallel
        self.model_name = f"openai:{api_model}"
        self._key = api_key
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.requests = 0  # HTTP requests sent (retries included)
        self._lock = threading.Lock()

    # HTTP

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _http(self, method: str, path: str, body: dict | None = None, *, timeout: float | None = None) -> dict:
        """One request, decoded JSON back. Raises urllib's HTTPError / URLError / TimeoutError."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)
        with self._lock:
            self.requests += 1
        with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
            payload = response.read()
        try:
            return json.loads(payload)
        except ValueError:
            raise ServerError(f"{self.base_url}{path} answered with something that is not JSON") from None

    def _reason(self, exc: BaseException) -> str:
        if isinstance(exc, urllib.error.HTTPError):
            try:
                detail = exc.read().decode("utf-8", "replace")
                parsed = json.loads(detail)
                error = parsed.get("error", parsed.get("detail", detail)) if isinstance(parsed, dict) else detail
                detail = error.get("message", str(error)) if isinstance(error, dict) else str(error)
            except (OSError, ValueError):
                detail = ""
            detail = " ".join(self._scrub(detail).split())[:300]
            return f"HTTP {exc.code}" + (f": {detail}" if detail else "")
        if isinstance(exc, urllib.error.URLError):
            return str(getattr(exc.reason, "strerror", None) or exc.reason)
        return str(exc) or type(exc).__name__

    def check_server(self, models: Iterable[str]) -> None:
        """Before any work: the server answers, takes the key, and serves each model (when it
        lists its models at GET /models). One-line KgenError otherwise."""
        try:
            listing = self._http("GET", "/models", timeout=min(self.timeout, 30.0))
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise KgenError(f"the server at {self.base_url} refused the API key ({self._reason(exc)})",
                                hint="set OPENAI_API_KEY or --api-key-env NAME") from None
            if exc.code in (404, 405, 501):
                return  # no model listing here: the first request will tell
            raise KgenError(f"the server at {self.base_url} failed: {self._reason(exc)}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise KgenError(f"cannot reach the server at {self.base_url}: {self._reason(exc)}",
                            hint="check --base-url and that the server is running") from None
        served = [str(m.get("id")) for m in listing.get("data", []) if isinstance(m, dict)] if isinstance(listing, dict) else []
        for model in models:
            if served and model not in served:
                raise KgenError(f"the server at {self.base_url} does not serve the model {model!r}; it serves: "
                                f"{', '.join(served[:10])}", hint="use one of them with --api-model")

    def chat(self, call: ChatCall) -> str:
        """The assistant's text for one call, retrying 429 / 5xx / connection errors with backoff."""
        body = {
            "model": call.model or self.api_model,
            "messages": [{"role": role, "content": content} for role, content in call.messages],
            "temperature": call.params.temperature,
            "top_p": call.params.top_p,
            "max_tokens": call.params.max_tokens,
            "seed": call.seed,
        }
        for attempt in range(self.retries + 1):
            try:
                answer = self._http("POST", "/chat/completions", body)
                break
            except urllib.error.HTTPError as exc:
                retry = exc.code == 429 or exc.code >= 500
                if not retry or attempt == self.retries:
                    raise ServerError(f"the server failed: {self._reason(exc)}") from None
                wait = _retry_after(exc) or self.backoff * 2**attempt
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                if attempt == self.retries:
                    raise ServerError(f"the server did not answer: {self._reason(exc)}") from None
                wait = self.backoff * 2**attempt
            time.sleep(min(wait, 60.0))
        try:
            text = answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ServerError("the server's answer has no choices[0].message.content") from None
        return text or ""

    def close(self) -> None:
        """Nothing to free: abandoned workers are daemons."""

    # jobs

    def _ask(self, request):
        """One call over HTTP (a generator that never yields, for `_relay`)."""
        if not isinstance(request, ChatCall):
            raise KgenError("the openai backend takes chat calls only")
        return self.chat(request)
        yield  # pragma: no cover - makes this a generator

    def _drive(self, job) -> Any:
        try:
            next(_relay(job, self._ask))
        except StopIteration as stop:  # the calls never yield: the job runs to its end here
            return stop.value
        raise KgenError("internal error: an HTTP call yielded")

    def run(self, jobs: Iterable[tuple[Hashable, Any]], on_result: OnResult,
            check: Callable[[], None] | None = None) -> None:  # fmt: skip
        """Run the jobs on `parallel` daemon threads; results reported here, as they end. On a
        stop request the workers are abandoned (daemons: they never hold up the exit)."""
        todo: queue.Queue = queue.Queue()
        done: queue.Queue = queue.Queue()

        def worker() -> None:
            while (item := todo.get()) is not None:
                key, job = item
                try:
                    done.put((key, self._drive(_guarded(job)), None))
                except KgenError as exc:
                    done.put((key, None, exc))
                except BaseException as exc:  # a bug: reported in the main thread
                    done.put((key, None, exc))

        threads = [threading.Thread(target=worker, daemon=True, name=f"kgen-openai-{i}") for i in range(self.parallel)]
        for thread in threads:
            thread.start()
        pending = 0
        source = iter(jobs)
        exhausted = False
        try:
            while True:
                while not exhausted and pending < 2 * self.parallel:
                    try:
                        todo.put(next(source))
                        pending += 1
                    except StopIteration:
                        exhausted = True
                if exhausted and pending == 0:
                    break
                if check is not None:
                    check()
                try:
                    key, value, error = done.get(timeout=0.1)
                except queue.Empty:
                    continue
                pending -= 1
                if error is not None and not isinstance(error, KgenError):
                    raise error
                on_result(key, value, error)
        finally:
            while True:  # let idle workers end; busy ones are abandoned
                try:
                    todo.get_nowait()
                except queue.Empty:
                    break
            for _ in threads:
                todo.put(None)


def _retry_after(exc: urllib.error.HTTPError) -> float | None:
    value = exc.headers.get("Retry-After") if exc.headers else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


# -- opening a local model ------------------------------------------------------------------------

CHAT_CONTEXT_LENGTH = 2048  # one chat call's window: a template with tag descriptions + 256 new tokens
CHAT_PROMPT_EXTRA = 512  # KV cells the default context reserves per sequence beyond a TIPO prompt's


def load_tipo(model: str | None, *, parallel: int, max_tokens: int, n_ctx: int | None = None,
              context_length: int | None = None, threads: int | None = None, gpu_layers: int | str = "auto",
              verbose: bool = False) -> TipoBackend:  # fmt: skip
    """The registry's TIPO model (or a local TIPO .gguf), opened through the library
    (`kgen_cli.load`), its context sized as `kgen batch` sizes it for `parallel` sequences."""
    from kgen_cli.api import load
    from kgen_cli.options import GenerationOptions

    gen = load(model, family="tipo", gpu_layers=gpu_layers, threads=threads, n_ctx=n_ctx,
               context_length=context_length, verbose=verbose, lazy=True,
               defaults=GenerationOptions(max_tokens=max_tokens))
    if gen.family != "tipo":
        gen.close()
        raise KgenError(f"{gen.model.name} is a {gen.family.upper()} model; captions need a TIPO model")
    return TipoBackend(gen, parallel=parallel)


def chat_model(model: str, chat_template: str | None) -> tuple[Path, str]:
    """(path, chat template) of a local instruct GGUF, checked without loading it."""
    from kgen_cli.engine import chat_template as template_for

    path = Path(model).expanduser()
    if not path.is_file():
        raise KgenError(f"--model {model}: no such file (the chat backend takes a local instruct .gguf)")
    return path, template_for(path, chat_template)


def load_chat(path: Path, *, chat_template: str, parallel: int, max_tokens: int, n_ctx: int | None = None,
              context_length: int | None = None, threads: int | None = None, gpu_layers: int | str = "auto",
              verbose: bool = False) -> LocalBackend:  # fmt: skip
    """A local instruct GGUF (`chat_model`) with one KV buffer for the `parallel` sequences: the
    prompts of a run start with the same instructions (the templates put them first), decoded
    once and forked (on SmolLM2 this halves the CPU time a run takes, against a KV stream per
    sequence). Each call spans at most `context_length` positions."""
    from kgen_cli import runner
    from kgen_cli.batchjobs import SHARE_PREFIX, batch_n_ctx

    length = context_length or CHAT_CONTEXT_LENGTH
    # batch_n_ctx reserves a TIPO-sized prompt per sequence; chat prompts (instructions, tag
    # descriptions) are longer.
    cells = n_ctx or batch_n_ctx(parallel, max_tokens + CHAT_PROMPT_EXTRA, length, unified=True)
    engine, _ = runner.open_engine(runner.EngineConfig(
        model_path=str(path), n_ctx=cells, gpu_layers=gpu_layers, threads=threads, verbose=verbose,
        n_seq_max=parallel, context_length=length, kv_unified=True))
    return LocalBackend(engine, model_name=path.name, parallel=parallel, chat_template=chat_template,
                        share_prefix=SHARE_PREFIX)
