"""Activation patterns frozen for exact finite differences (DSRNA's Jacobian metric by finite
differences, distsearch/robust/jacobian.py; Hosseini, Yang, Xie, CVPR 2021, section 3.1).

With BN frozen, a supernet is piecewise linear in its input: f(x + h u) - f(x) = h J(x) u only
while no ReLU and no max pool changes its choice between x and x + h u. One that does leaves
the value O(h) but adds an O(1/h) term to the difference's gradient in the parameters (and
in alpha): on a 5-cell supernet at h = 1e-3 that gradient was 70-290 % off the exact one.
Inside `frozen_pattern(base, copies)` every batch ends with `base` rows x and `copies` x base
moved rows (copy c of row i is x_i + h u_ci); each ReLU and max pool here applies row i's
choice (its mask, its argmax) to the moved rows of x_i. The network is then linear along
every segment, so the difference is h J(x) u exactly, for any h, and its gradient is that of
J(x) u. Rows before the base rows (the DSRNA searcher's validation batch) run as usual.

The same kinks break the second-order hypergradient's finite differences in the weights
(DARTS eq. 8, distsearch/search/hypergrad.py): (grad_a L(w + R v) - grad_a L(w - R v)) / 2R
was 770 % off the exact mixed second derivative on a 5-cell supernet at the paper's r = 0.01.
A `Pattern` holds the choices of one forward in call order: `recording(p)` fills it (the
virtual step's forward at w), `replaying(p)` applies them to forwards of the same batch at
other weights (w +- R v). The loss is then smooth in w along the segment and the central
difference is the exact derivative up to O(R^2).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

_FROZEN: list[tuple[int, int, dict]] = []  # (base rows, copies, row indices by (rows, device))


class Pattern:
    """The ReLU masks and max-pool argmaxes of one forward, in call order (module text)."""

    def __init__(self) -> None:
        self.choices: list[torch.Tensor] = []
        self.next: int | None = None  # None while recording

    def take(self, shape: torch.Size, dims: int | None = None) -> torch.Tensor:
        """The next recorded choice; its shape's first `dims` entries (all: None) must be `shape`'s."""
        n = self.next
        if n is None or n >= len(self.choices) or self.choices[n].shape[:dims] != shape[:dims]:
            raise RuntimeError(
                f"replaying a Pattern: call {self.next} (shape {tuple(shape)}) does not follow the recorded "
                f"forward ({len(self.choices)} choices): replay the same batch through the same model"
            )
        self.next += 1
        return self.choices[self.next - 1]


_PATTERN: list[Pattern] = []


@contextmanager
def recording(pattern: Pattern) -> Iterator[Pattern]:
    """Every ReLU and max pool here records its choice into `pattern` (and runs as usual)."""
    pattern.choices, pattern.next = [], None
    _PATTERN.append(pattern)
    try:
        yield pattern
    finally:
        _PATTERN.pop()


@contextmanager
def replaying(pattern: Pattern) -> Iterator[None]:
    """Every ReLU and max pool here applies the recorded choice, in the recorded order."""
    pattern.next = 0
    _PATTERN.append(pattern)
    try:
        yield
    finally:
        _PATTERN.pop()
    if pattern.next != len(pattern.choices):
        raise RuntimeError(f"replaying a Pattern: {pattern.next} of {len(pattern.choices)} recorded choices used")


@contextmanager
def frozen_pattern(base: int, copies: int) -> Iterator[None]:
    """Moved rows follow their base row's ReLU masks and max-pool choices (module text)."""
    _FROZEN.append((base, copies, {}))
    try:
        yield
    finally:
        _FROZEN.pop()


def _leaders(rows: int, device: torch.device) -> torch.Tensor:
    """For every row of the batch, the row whose choices it takes (its own, or its base row)."""
    base, copies, cache = _FROZEN[-1]
    free = rows - base * (1 + copies)
    if free < 0:
        raise ValueError(f"frozen_pattern: a batch of {rows} rows cannot end with {base} + {copies} x {base}")
    if (rows, device) not in cache:
        own = torch.arange(free + base, device=device)
        cache[rows, device] = torch.cat([own, own[free:].repeat(copies)])
    return cache[rows, device]


def make_replayable(module: nn.Module) -> int:
    """Swap every torch nn.ReLU and nn.MaxPool2d inside `module` (in place) for this module's
    subclasses: the same function, now recorded and replayed by the contexts above. Returns
    how many were swapped. ReLUs called as F.relu in a forward cannot be reached."""
    swapped = 0
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.ReLU:
                setattr(parent, name, ReLU())
            elif type(child) is nn.MaxPool2d and not child.return_indices:
                pool = MaxPool2d(
                    child.kernel_size, child.stride, child.padding, child.dilation, ceil_mode=child.ceil_mode
                )
                setattr(parent, name, pool)
            else:
                continue
            swapped += 1
    return swapped


class ReLU(nn.ReLU):
    """nn.ReLU; inside frozen_pattern, x * mask with each moved row taking its base row's mask;
    recording a Pattern, torch's op and the mask recorded; replaying one, x * the recorded mask."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _FROZEN:
            return x * (x > 0).index_select(0, _leaders(x.shape[0], x.device))
        if not _PATTERN:
            return super().forward(x)
        p = _PATTERN[-1]
        if p.next is not None:
            return x * p.take(x.shape)
        p.choices.append(x > 0)
        return super().forward(x)


class MaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d; inside frozen_pattern, each moved row picks its base row's argmax;
    recording a Pattern, the argmax recorded; replaying one, x at the recorded argmax."""

    def _with_indices(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.max_pool2d(
            x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode, return_indices=True
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _FROZEN:
            with torch.no_grad():
                idx = self._with_indices(x)[1].index_select(0, _leaders(x.shape[0], x.device))
        elif not _PATTERN:
            return super().forward(x)
        elif _PATTERN[-1].next is None:
            out, idx = self._with_indices(x)
            _PATTERN[-1].choices.append(idx)
            return out
        else:
            idx = _PATTERN[-1].take(x.shape, dims=2)
        return x.flatten(2).gather(2, idx.flatten(2)).view_as(idx)
