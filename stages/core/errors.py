"""The errors a stage reports in one line, without a traceback.

:class:`UserError`: the user's to fix, exit 2. :class:`StoreError`: the artifact store kept failing, exit 1
(the orchestrator retries the task).
"""


class UserError(Exception):
    """Bad config, bad input data or a bad artifact location.

    The message must name the field or file and the offending value, so that the user can fix it
    from the message alone.
    """


class ConfigError(UserError, ValueError):
    """A config value is unknown, of the wrong type or out of range."""


class StoreError(RuntimeError):
    """The store kept failing after bounded retries (transient infrastructure, worth a task retry)."""
