"""The errors a stage reports in one line, without a traceback.

:class:`UserError`: the user's to fix, exit 2 (:class:`InputNotFound`: an input URI that names no file).
:class:`StoreError`: the artifact store kept failing, exit 1 (the orchestrator retries the task).
"""

from typing import Any

SHOWN_CHARS = 80


def shown(value: Any) -> str:
    """A value as a message quotes it: its repr, cut to its first characters (a megabyte is not echoed)."""
    text = repr(value)
    if len(text) <= SHOWN_CHARS:
        return text
    size = f"{len(value)} characters" if isinstance(value, (str, list, dict)) else "cut"
    return f"{text[:SHOWN_CHARS]}... ({size})"


class UserError(Exception):
    """Bad config, bad input data or a bad artifact location.

    The message must name the field or file and the offending value, so that the user can fix it
    from the message alone.
    """


class ConfigError(UserError, ValueError):
    """A config value is unknown, of the wrong type or out of range."""


class InputNotFound(UserError, FileNotFoundError):
    """An input URI names no file: nothing is there, or a folder or glob holds no files.

    Also a FileNotFoundError, so that a caller that handles missing files handles it too: the runner,
    hashing a stage's inputs, reports it naming the input field.
    """


class StoreError(RuntimeError):
    """The store kept failing after bounded retries (transient infrastructure, worth a task retry)."""
