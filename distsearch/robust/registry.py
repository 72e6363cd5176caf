"""Build a registered class by name (attacks, AT strategies): one clear error per bad name or option."""

from __future__ import annotations

import inspect
from typing import Any, TypeVar

T = TypeVar("T")


def build_registered(kind: str, registry: dict[str, type[T]], name: str, kwargs: dict[str, Any]) -> T:
    """`registry[name](**kwargs)`; an unknown name or parameter raises ValueError naming it."""
    if name not in registry:
        raise ValueError(f"{kind}: unknown name {name!r}; choose one of {', '.join(registry)}")
    cls = registry[name]
    init = cls.__init__
    allowed = [] if init is object.__init__ else [p for p in inspect.signature(init).parameters if p != "self"]
    for key in kwargs:
        if key not in allowed:
            raise ValueError(f"{key}: not a parameter of {kind} {name!r}; it takes {', '.join(allowed) or 'none'}")
    return cls(**kwargs)
