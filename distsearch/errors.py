"""The one error type the CLI turns into a single line and exit code 2."""


class UsageError(ValueError):
    """A bad config value, flag, URI or file: the message names the field and the fix."""


def checkpoint_mismatch(field: str, name: str, error: Exception, fix: str) -> UsageError:
    """A checkpoint whose tensors do not fit the model its config builds (another layout)."""
    why = str(error).strip().splitlines()[0][:300]
    return UsageError(f"{field}: checkpoint {name} does not fit the model its config builds ({why}); {fix}")
