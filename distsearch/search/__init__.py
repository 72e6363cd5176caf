"""How architectures are searched: one Searcher interface, one file per algorithm."""

from .base import Searcher
from .darts import DartsSearcher
from .dsrna import DsrnaSearcher
from .lease import LeaseSearcher

SEARCHERS: dict[str, type[Searcher]] = {"darts": DartsSearcher, "lease": LeaseSearcher, "dsrna": DsrnaSearcher}

__all__ = ["SEARCHERS", "DartsSearcher", "DsrnaSearcher", "LeaseSearcher", "Searcher"]
