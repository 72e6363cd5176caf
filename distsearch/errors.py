"""The one error type the CLI turns into a single line and exit code 2."""


class UsageError(ValueError):
    """A bad config value, flag, URI or file: the message names the field and the fix."""
