"""The errors a user can be told about, in one place; the CLI maps them to exit codes (2: bad input or a
refusal, 3: transient server trouble). DataError lives in the runtime, which a logged model ships alone."""

from __future__ import annotations

from torchcycle.runtime.types import DataError

__all__ = ["ConfigError", "DataError", "ServiceDown", "StorageError"]


class ConfigError(ValueError):
    """A bad experiment config: the message names the offending key and what was expected."""


class StorageError(DataError):
    """A file could not be read or written (read-only, a directory, no space): names the path and the cause.
    Not transient: a retry meets the same file system."""


class ServiceDown(RuntimeError):
    """A service the command needs is not there (a Dask scheduler without workers, say): worth trying again
    later, exit code 3."""
