"""The one error type the CLI turns into a single line and exit code 2, and the argparse
types of the --out flags (checked before any work, so a bad one fails in seconds)."""

import argparse
import os


class UsageError(ValueError):
    """A bad config value, flag, URI or file: the message names the field and the fix."""


def checkpoint_mismatch(field: str, name: str, error: Exception, fix: str) -> UsageError:
    """A checkpoint whose tensors do not fit the model its config builds (another layout)."""
    why = str(error).strip().splitlines()[0][:300]
    return UsageError(f"{field}: checkpoint {name} does not fit the model its config builds ({why}); {fix}")


def out_uri(text: str) -> str:
    """--out of a run: a storage URI, not empty."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a folder or storage URI, got an empty string")
    return text


def out_folder(text: str) -> str:
    """--out of a command's tables and pictures: a folder (made if missing) or storage URI, not a file."""
    out_uri(text)
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a file; give a folder")
    return text
