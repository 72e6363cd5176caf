"""Checkpoints of the per-edge supernet read into today's grouped one.

Up to commit 53024d6 a search cell held one mixed op per edge (DARTS eq. 2 as written):
state_dict keys `cells.k.edges.j.ops.o.<tensor>`, edge j = num_edges(i) + s for node i <- state
s, op o = its index in `ops`. search_spaces/darts.py now runs the edges that read one state as
one EdgeGroup (`cells.k.groups.s.ops.<op>`, `.bn`) computing the same function, so a per-edge
checkpoint moves over exactly: each edge op's tensor goes to its rows of the group's
(`SearchCell.edge_slots`); everything else keeps its name. `Supernet.load_state_dict` does this
by itself (a load pre-hook); `regroup_optimizer` moves an optimiser's per-parameter state
(SGD momenta), which is keyed by the parameters' order.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .darts import Supernet

PER_EDGE = re.compile(r"cells\.(\d+)\.edges\.(\d+)\.ops\.(\d+)\.(.+)")
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
ARCH = ("alphas_normal", "alphas_reduce")


class LayoutError(RuntimeError):
    """A per-edge checkpoint that does not fit the supernet (a RuntimeError, as
    `load_state_dict` raises for any state that does not fit)."""


def is_per_edge(keys: Iterable[str]) -> bool:
    """Whether state_dict keys are of the per-edge layout."""
    return any(PER_EDGE.fullmatch(k) for k in keys)


def _edge(j: int) -> tuple[int, int]:
    """(node i, state s) of per-edge index j = num_edges(i) + s."""
    i = 0
    while j >= 2 + i:
        j, i = j - (2 + i), i + 1
    return i, j


def regroup(
    model: Supernet, old: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """`old`, named tensors of the per-edge layout (a state_dict, or one tensor per parameter
    such as momenta), as the tensors named by `like` (the same selection of `model`'s
    state_dict in the grouped layout). LayoutError names a tensor that has no place or does not
    fit it, or a place that nothing fills."""
    out: dict[str, torch.Tensor] = {}
    filled: dict[str, torch.Tensor] = {}  # rows written so far, per grouped tensor
    slots: dict[tuple[int, int, int], dict[str, tuple[str, slice | None]]] = {}
    for k, v in old.items():
        m = PER_EDGE.fullmatch(k)
        if m is None:
            if k not in like:
                raise LayoutError(f"{k!r} has no place in this supernet")
            out[k] = v
            continue
        c, j, o, rest = int(m[1]), int(m[2]), int(m[3]), m[4]
        node, state = _edge(j)
        if c >= len(model.cells) or node >= model.nodes or o >= len(model.ops):
            raise LayoutError(f"{k!r} has no place in this supernet")
        if (c, j, o) not in slots:  # one edge op's tensors come in a run: build its map once
            slots[c, j, o] = model.cells[c].edge_slots(state, node, model.ops[o])
        slot = slots[c, j, o].get(rest)
        if slot is None:
            raise LayoutError(f"{k!r} has no place in this supernet (op {model.ops[o]!r})")
        key, rows = f"cells.{c}.{slot[0]}", slot[1]
        if key not in like:
            continue  # a tensor outside the selection (a buffer, when moving momenta)
        if key not in out:
            out[key] = torch.empty(like[key].shape, dtype=v.dtype, device=v.device)
            filled[key] = torch.zeros(len(like[key]) if like[key].dim() else 1, dtype=torch.bool)
        target = out[key] if rows is None else out[key][rows]
        if target.shape != v.shape:
            raise LayoutError(f"{k!r}: shape {tuple(v.shape)} does not fit {tuple(target.shape)} in {key!r}")
        target.copy_(v)
        filled[key][slice(None) if rows is None else rows] = True
    unfilled = [k for k in like if k not in out or (k in filled and not bool(filled[k].all()))]
    if unfilled:
        more = f" (and {len(unfilled) - 1} more)" if len(unfilled) > 1 else ""
        raise LayoutError(f"nothing in the per-edge checkpoint fills {unfilled[0]!r}{more}")
    return out


def regroup_optimizer(model: Supernet, old_model: Mapping[str, torch.Tensor], state: dict[str, Any]) -> dict[str, Any]:
    """The state_dict of an optimiser over `model.weight_parameters()` written while the model
    had the per-edge layout `old_model` (its state_dict, whose order gives the parameters'),
    for the grouped parameters: each per-parameter tensor (an SGD momentum) is moved like its
    parameter; a parameter without state gets none."""
    old_names = [k for k in old_model if not k.endswith(BUFFERS) and k not in ARCH]
    if len(state["param_groups"]) != 1:  # the searchers' weight optimisers have one group
        raise LayoutError(f"an optimiser with {len(state['param_groups'])} parameter groups (one expected)")
    group = state["param_groups"][0]
    if len(group["params"]) != len(old_names):
        raise LayoutError(f"the optimiser holds {len(group['params'])} parameters, the per-edge model {len(old_names)}")
    like = {n: p.detach() for n, p in model.named_parameters() if n not in ARCH}
    per_param = {n: state["state"].get(pos) for n, pos in zip(old_names, group["params"], strict=True)}
    fields = {f for s in per_param.values() if s for f in s}
    moved: dict[str, dict[str, Any]] = {n: {} for n in like}
    for f in fields:
        named = {n: s[f] for n, s in per_param.items() if s and f in s}
        if len(named) != len(old_names):
            raise LayoutError(f"optimiser state {f!r} is kept for some parameters only")
        for n, t in regroup(model, named, like).items():
            moved[n][f] = t
    return {
        "state": {i: moved[n] for i, n in enumerate(like) if moved[n]},
        "param_groups": [{**group, "params": list(range(len(like)))}],
    }
