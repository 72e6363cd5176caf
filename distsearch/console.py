"""The `distsearch` console script. Loading torch and the rest takes a second or two before
cli.main can catch anything: a Ctrl-C then exits 130 with one line, as it does later on."""

from __future__ import annotations

import sys


def run() -> int:
    try:
        from .cli import main
    except KeyboardInterrupt:
        print("interrupted while starting; nothing was written", file=sys.stderr)
        return 130
    return main()
