"""How architectures are searched: one Searcher interface, one file per algorithm."""

from .base import Searcher
from .darts import DartsSearcher

__all__ = ["DartsSearcher", "Searcher"]
