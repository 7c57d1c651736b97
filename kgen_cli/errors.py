"""Errors shown to the user as one line; the CLI's `main()` is the only place that prints them."""

from __future__ import annotations


class KgenError(Exception):
    """A failure the user can act on; its message is displayed as is. Exit status 1."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class UsageError(KgenError):
    """Bad arguments or input the user typed (invalid regex, template, level...). Exit status 2."""

    exit_code = 2


class RegistryError(KgenError):
    """models.yaml (packaged or the user's) is malformed."""

    exit_code = 2


class ModelNotFoundError(KgenError):
    """A registry model that is not on disk, or an unknown model name."""


class DownloadError(KgenError):
    """The hub could not deliver a file, or it failed its sha256 check."""


class EngineError(KgenError):
    """llama.cpp refused a model, a context or a decode."""


class StopRequested(Exception):
    """A long run asked to stop (kgen batch: a signal, --fail-fast): never one input's error."""


class OutputClosed(Exception):
    """stdout's reader went away (`kgen ... | head`): the run stops quietly, exit 128 + SIGPIPE.
    Not an OSError, so that click does not turn it into exit status 1."""
