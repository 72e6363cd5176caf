"""What torch.load(weights_only=True) reads back, and why it refuses the rest: checkpoints are
never unpickled (storage.py), so a state it cannot read is refused before it is written, with
the key path and type of the first value at fault.
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from typing import Any

import torch


def read_state(data: bytes, map_location: str | torch.device = "cpu") -> Any:
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)


def refusal(e: BaseException) -> str:
    """The line of a weights_only refusal that names its cause (torch's message is a page)."""
    lines = str(e).splitlines()
    for line in lines:
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].split(" Please use", 1)[0].strip()
    return next((ln.strip() for ln in lines if ln.strip()), type(e).__name__)


_PLAIN = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size)
_CONTAINERS = (dict, OrderedDict, list, tuple, set)  # as weights_only reads them (a frozenset it refuses)


def _loads_alone(obj: Any) -> bool:
    buf = io.BytesIO()
    try:
        torch.save(obj, buf)
        read_state(buf.getvalue())
    except Exception:  # noqa: BLE001 - any failure means "not readable back"
        return False
    return True


def _first_unloadable(obj: Any, path: str = "") -> tuple[str, Any] | None:
    """Depth first, the key path (as `['model']['w']`) and value of the first value under `obj` that
    weights_only cannot read back; plain values and tensors are taken as readable without a test."""
    kind = type(obj)
    if kind in _PLAIN or kind in (torch.Tensor, torch.nn.Parameter):
        return None
    if kind in _CONTAINERS:
        if kind is set:
            return next(filter(None, (_first_unloadable(v, f"{path} (an element)") for v in obj)), None)
        for k, v in obj.items() if isinstance(obj, dict) else enumerate(obj):
            if isinstance(obj, dict) and type(k) not in _PLAIN and not _loads_alone(k):
                return f"{path} (the key {k!r})", k
            if found := _first_unloadable(v, f"{path}[{k!r}]"):
                return found
        return None
    return None if _loads_alone(obj) else (path, obj)


def check_loadable(state: Any, data: bytes | None = None) -> None:
    """Raise TypeError, naming the key path and type, when torch.load(weights_only=True) cannot
    read `state` back (`data`: its torch.save bytes, when already serialised)."""
    if data is None:
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
    try:
        read_state(data)
    except pickle.UnpicklingError as e:
        found = _first_unloadable(state)
        what = "the state" if found is None else f"state{found[0]} is a {_type_name(found[1])}: it"
        raise TypeError(
            f"save_checkpoint: {what} cannot be read back with torch.load(weights_only=True) ({refusal(e)}); "
            "store tensors and plain Python values (numbers, strings, lists, tuples, dicts) instead, e.g. "
            "torch.as_tensor(array) or array.tolist(), genotype.to_dict(); nothing was written"
        ) from None


def _type_name(obj: Any) -> str:
    kind = type(obj)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
