"""Errors that are the user's to fix: the runner prints them without a traceback and exits 2."""


class UserError(Exception):
    """Bad config, bad input data or a bad artifact location.

    The message must name the field or file and the offending value, so that the user can fix it
    from the message alone.
    """


class ConfigError(UserError, ValueError):
    """A config value is unknown, of the wrong type or out of range."""
