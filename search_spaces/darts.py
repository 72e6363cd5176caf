"""The DARTS cell search space and supernet (Liu et al., ICLR 2019, eqs. 1-2 and section 2.4).

Mixed op (eq. 2): o_bar(x) = sum_o softmax(alpha)_o * o(x). Each intermediate node sums
the mixed ops of all earlier nodes; the cell output concatenates the last `multiplier`
intermediates. Architecture weights (normal, reduce) are kept apart from the network
weights: `arch_parameters()` / `weight_parameters()`. All mixed-op arithmetic lives in
`MixedOp.terms`, the one place to batch candidate ops later.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .genotype import Genotype
from .operations import PRIMITIVES, BatchNorm2d, FactorizedReduce, Zero, make_op, relu_conv_bn

Weights = torch.Tensor | Sequence[torch.Tensor | None]
Source = torch.Tensor | Iterator[torch.Tensor]


class _FanOut(torch.autograd.Function):
    """n aliases of x; their gradients are summed by one stack + sum in the backward, where
    autograd would add them one by one (n - 1 kernels). Differentiable again."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:  # noqa: ANN001
        ctx.set_materialize_grads(False)
        return tuple(x.view_as(x) for _ in range(n))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, None]:  # noqa: ANN001
        gs = [g for g in grads if g is not None]
        return (sum_all(gs) if gs else None), None


def fan_out(x: torch.Tensor, n: int) -> Iterator[torch.Tensor]:
    """An iterator over the n readers' copies of x (aliases sharing one gradient sum when x
    needs a gradient, else x itself)."""
    if n > 1 and x.requires_grad and torch.is_grad_enabled():
        return iter(_FanOut.apply(x, n))
    return itertools.repeat(x, n)


def _source(x: Source | None) -> Iterator[torch.Tensor] | None:
    return x if x is None or isinstance(x, Iterator) else itertools.repeat(x)


class MixedOp(nn.Module):
    """One edge: sum_o softmax(alpha)_o * o(x) over the candidate ops (eq. 2).

    Computed with fewer kernels than op by op, with the same value: each weight is folded
    into the op's final BatchNorm (`BatchNorm2d(x, scale)`), the ops that begin with a ReLU
    share `relu(x)` (which the cell computes once per state for all edges that read it), and
    'none' is left out (w * 0 adds nothing; its alpha still enters the softmax).
    """

    def __init__(self, C: int, stride: int, ops: tuple[str, ...]):
        super().__init__()
        self.ops = nn.ModuleList(make_op(name, C, stride, affine=False, search=True) for name in ops)
        self._plan = [_plan(op) for op in self.ops]  # not registered: the same modules as self.ops
        steps = [step for step in self._plan if step is not None]
        self.reads = sum(not s[0] for s in steps), sum(s[0] for s in steps)  # ops reading x, relu(x)
        self.reads_relu = self.reads[1] > 0

    def forward(self, x: torch.Tensor, weights: Weights, rx: torch.Tensor | None = None) -> torch.Tensor:
        return sum_all(self.terms(x, weights, rx))

    def terms(self, x: Source, weights: Weights, rx: Source | None = None) -> list[torch.Tensor]:
        """The weighted op outputs w_o * o(x). `weights`: one per op, each 0-dim or a row of
        one per channel ('none''s is not read); `rx` = relu(x) when the caller has it; x and
        rx may be iterators giving each reading op its own copy (`fan_out`)."""
        xs, rxs = _source(x), _source(rx)
        if rxs is None and self.reads_relu:
            rxs = itertools.repeat(F.relu(next(xs)))
        out = []
        for w, step in zip(weights, self._plan):
            if step is None:
                continue
            reads_relu, body, bn = step
            h = next(rxs) if reads_relu else next(xs)
            for m in body:
                h = m(h)
            out.append(bn(h, w) if bn is not None else h * (w[:, None, None] if w.dim() else w))
        return out


def sum_all(ts: list[torch.Tensor]) -> torch.Tensor:
    """The sum of equally shaped tensors in two kernels (stack, sum) instead of n - 1 adds;
    channels_last inputs give a channels_last sum."""
    if len(ts) == 1:
        return ts[0]
    nhwc = ts[0].dim() == 4 and not ts[0].is_contiguous() and ts[0].is_contiguous(memory_format=torch.channels_last)
    if nhwc:
        return torch.stack([t.permute(0, 2, 3, 1) for t in ts]).sum(0).permute(0, 3, 1, 2)
    return torch.stack(ts).sum(0)


Plan = tuple[bool, tuple[nn.Module, ...], Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None] | None


def _plan(op: nn.Module) -> Plan:
    """How MixedOp runs `op`: (reads relu(x), the modules in between, the last step taking
    the weight as its output scale: a BatchNorm2d or FactorizedReduce.from_relu; or None)."""
    if isinstance(op, Zero):
        return None
    if isinstance(op, FactorizedReduce):
        return True, (), op.from_relu
    mods = list(op) if isinstance(op, nn.Sequential) else [op]
    reads_relu = isinstance(mods[0], nn.ReLU)
    bn = mods[-1] if isinstance(mods[-1], BatchNorm2d) else None
    return reads_relu, tuple(mods[int(reads_relu) : len(mods) - (bn is not None)]), bn


class SearchCell(nn.Module):
    def __init__(
        self,
        nodes: int,
        multiplier: int,
        C_pp: int,
        C_p: int,
        C: int,
        reduction: bool,
        reduction_prev: bool,
        ops: tuple[str, ...],
    ):
        super().__init__()
        self.reduction, self.nodes, self.multiplier = reduction, nodes, multiplier
        self.preprocess0 = (
            FactorizedReduce(C_pp, C, affine=False) if reduction_prev else relu_conv_bn(C_pp, C, 1, 1, 0, affine=False)
        )
        self.preprocess1 = relu_conv_bn(C_p, C, 1, 1, 0, affine=False)
        self.edges = nn.ModuleList()
        self.C = C
        readers: list[list[int]] = [[] for _ in range(1 + nodes)]  # the edges reading each state
        for i in range(nodes):
            for j in range(2 + i):
                stride = 2 if reduction and j < 2 else 1
                readers[j].append(len(self.edges))
                self.edges.append(MixedOp(C, stride, ops))
        self.reads = [tuple(sum(self.edges[e].reads[k] for e in es) for k in (0, 1)) for es in readers]
        self.kept = [k for k, o in enumerate(ops) if o != "none"]

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        # every op's weight as a row of C (the BN weight it becomes): one backward kernel (a
        # stack) and one sum for all of them, where each 0-dim weight's expand summed its own
        rows = iter(weights[:, self.kept].reshape(-1, 1).expand(-1, self.C).unbind())
        w = [[next(rows) if o in self.kept else None for o in range(weights.shape[1])] for _ in self.edges]
        sources = [self._fan_out(h, s) for s, h in enumerate(states)]
        offset = 0
        for i in range(self.nodes):
            terms = []
            for j, (xs, rxs) in enumerate(sources):
                terms += self.edges[offset + j].terms(xs, w[offset + j], rxs)
            offset += len(sources)
            states.append(sum_all(terms))
            if i < self.nodes - 1:
                sources.append(self._fan_out(states[-1], 2 + i))
        return torch.cat(states[-self.multiplier :], dim=1)

    def _fan_out(self, h: torch.Tensor, s: int) -> tuple[Iterator[torch.Tensor], Iterator[torch.Tensor] | None]:
        """State s as one copy per op that reads it and one per op that reads relu(s), so
        each of their gradients is summed in one step (`fan_out`)."""
        n_x, n_rx = self.reads[s]
        xs = fan_out(h, n_x + (n_rx > 0))
        return xs, (fan_out(F.relu(next(xs)), n_rx) if n_rx else None)


def reduction_layers(layers: int) -> tuple[int, ...]:
    """Cells at 1/3 and 2/3 of the depth reduce resolution (deduplicated for tiny nets)."""
    return tuple(sorted({layers // 3, 2 * layers // 3}))


def num_edges(nodes: int) -> int:
    return sum(2 + i for i in range(nodes))


class Supernet(nn.Module):
    """DARTS supernet: stem, `layers` search cells, global pooling, linear classifier."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        C: int = 16,
        layers: int = 8,
        nodes: int = 4,
        multiplier: int | None = None,
        stem_multiplier: int = 3,
        ops: tuple[str, ...] = PRIMITIVES,
        image_size: int | None = None,
    ):
        super().__init__()
        ops = tuple(ops)
        unknown = [o for o in ops if o not in PRIMITIVES]
        if unknown:
            raise ValueError(f"space.ops: unknown op(s) {unknown}; known: {', '.join(PRIMITIVES)}")
        if len(set(ops)) != len(ops) or not [o for o in ops if o != "none"]:
            raise ValueError("space.ops: needs distinct ops and at least one op other than 'none'")
        if image_size is not None and image_size < 2 ** len(reduction_layers(layers)):
            raise ValueError(
                f"space: image_size {image_size} is too small for {len(reduction_layers(layers))} reductions"
            )
        self.ops, self.nodes = ops, nodes
        self.multiplier = multiplier or nodes
        self.config = dict(
            in_channels=in_channels,
            num_classes=num_classes,
            C=C,
            layers=layers,
            nodes=nodes,
            multiplier=self.multiplier,
            stem_multiplier=stem_multiplier,
            ops=list(ops),
        )
        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(in_channels, C_curr, 3, padding=1, bias=False), BatchNorm2d(C_curr))
        C_pp, C_p, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev, reductions = False, reduction_layers(layers)
        for i in range(layers):
            reduction = i in reductions
            if reduction:
                C_curr *= 2
            self.cells.append(SearchCell(nodes, self.multiplier, C_pp, C_p, C_curr, reduction, reduction_prev, ops))
            reduction_prev = reduction
            C_pp, C_p = C_p, self.multiplier * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_p, num_classes)
        k = num_edges(nodes)
        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(k, len(ops)))
        self.alphas_reduce = nn.Parameter(1e-3 * torch.randn(k, len(ops)))

    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alphas_normal, self.alphas_reduce]

    def weight_parameters(self) -> list[nn.Parameter]:
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def arch_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return F.softmax(self.alphas_normal, dim=-1), F.softmax(self.alphas_reduce, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_normal, w_reduce = self.arch_weights()
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, w_reduce if cell.reduction else w_normal)
        return self.classifier(self.global_pooling(s1).flatten(1))

    def derive(self) -> Genotype:
        w_normal, w_reduce = (w.detach().cpu() for w in self.arch_weights())
        concat = tuple(range(2 + self.nodes - self.multiplier, self.nodes + 2))
        return Genotype(
            derive_cell(w_normal, self.ops, self.nodes), concat, derive_cell(w_reduce, self.ops, self.nodes), concat
        )


def derive_cell(weights: torch.Tensor, ops: tuple[str, ...], nodes: int) -> tuple[tuple[str, int], ...]:
    """DARTS rule: per node keep the two inputs whose strongest non-'none' op is largest,
    and on each kept edge its strongest non-'none' op (ties go to the earlier index)."""
    keep = [k for k, o in enumerate(ops) if o != "none"]
    gene: list[tuple[str, int]] = []
    start = 0
    for i in range(nodes):
        W = weights[start : start + 2 + i][:, keep]
        best = W.max(dim=1).values
        inputs = sorted(range(2 + i), key=lambda j: (-float(best[j]), j))[:2]
        for j in sorted(inputs):
            gene.append((ops[keep[int(W[j].argmax())]], j))
        start += 2 + i
    return tuple(gene)
