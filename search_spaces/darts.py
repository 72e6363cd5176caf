"""The DARTS cell search space and supernet (Liu et al., ICLR 2019, eqs. 1-2 and section 2.4).

Mixed op (eq. 2): o_bar(x) = sum_o softmax(alpha)_o * o(x) on every edge. Each intermediate
node sums the mixed ops of all earlier nodes; the cell output concatenates the last
`multiplier` intermediates. Architecture weights (normal, reduce) are kept apart from the
network weights: `arch_parameters()` / `weight_parameters()`.

All mixed-op arithmetic lives in `EdgeGroup`: the edges that read one state run each
candidate op once for all of them, as E * C channels side by side, so a cell launches its
ops once per state instead of once per edge, with the value of the op-by-op sum
(`SearchCell.edge_op` gives any edge's op as a module of its own).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .genotype import Genotype
from .layout import is_per_edge, regroup
from .operations import (
    PRIMITIVES,
    BatchNorm2d,
    FactorizedReduce,
    Repeat,
    Zero,
    make_op,
    relu_conv_bn,
)
from .pattern import ReLU


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


def sum_all(ts: list[torch.Tensor]) -> torch.Tensor:
    """The sum of equally shaped tensors in two kernels (stack, sum) instead of n - 1 adds (one
    add for two), laid out in memory as the first one (channels_last in, channels_last out)."""
    if len(ts) <= 2:
        return ts[0] if len(ts) == 1 else ts[0] + ts[1]
    order = sorted(range(ts[0].dim()), key=lambda d: -ts[0].stride(d))  # outermost first
    if order == sorted(order):
        return torch.stack(ts).sum(0)
    return torch.stack([t.permute(order) for t in ts]).sum(0).permute([order.index(d) for d in range(len(order))])


class EdgeGroup(nn.Module):
    """The candidate ops of the E edges that read one state, each op run once for all of them.

    Every op but the identity holds the E edges' copies side by side (`edges=E`: from C to
    E * C channels, edge by edge; 1x1 convs grouped by edge; a pool runs once and is copied
    per edge); the sep and dil convs share one relu(x) repeated E times. The ops that end in a
    parameter-free BatchNorm (`normed`: sep, dil, pools) share one, over all their outputs
    side by side, whose weight is each edge's softmax(alpha) for that op, and are summed as
    they leave it; the stride-2 skip folds its weight into its own BN, the identity is scaled
    per edge (`per_edge`). 'none' is left out (w * 0 adds nothing; its alpha still enters the
    softmax). The ops' order: `names` (the normed ones first).
    """

    def __init__(self, C: int, stride: int, ops: tuple[str, ...], edges: int):
        super().__init__()
        self.C, self.E, self.stride = C, edges, stride
        self.relu = ReLU(inplace=False)
        self.repeat = Repeat(edges)
        built = {name: make_op(name, C, stride, affine=False, search=True, edges=edges) for name in ops}
        built = {name: op for name, op in built.items() if not isinstance(op, Zero)}
        self.normed = [
            n for n, op in built.items() if isinstance(op, nn.Sequential) and isinstance(op[-1], BatchNorm2d)
        ]
        self.names = [*self.normed, *(n for n in built if n not in self.normed)]
        self.ops = nn.ModuleDict(
            {n: nn.Sequential(*built[n][:-1]) if n in self.normed else built[n] for n in self.names}
        )
        self.bn = BatchNorm2d(len(self.normed) * edges * C, affine=False) if self.normed else None
        self.plan = [_plan(self.ops[n]) for n in self.normed]  # not registered: the same modules
        self.sizes = [len(self.normed) * edges * C] * bool(self.normed) + [edges * C] * (
            len(self.names) - len(self.normed)
        )

    def forward(self, x: torch.Tensor, rows: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Per edge, its mixed op sum_o w_o * o(x): E tensors [B, C, H', W']; rows: the weights
        of the edges repeated C times, for the normed ops together, then per other op."""
        n_rx = sum(on_relu for on_relu, _ in self.plan)
        xs = fan_out(x, len(self.names) - n_rx + (n_rx > 0))
        rxs = fan_out(self.repeat(self.relu(next(xs))), n_rx) if n_rx else None
        rows, out = iter(rows), []
        if self.plan:
            pre = []
            for on_relu, body in self.plan:
                h = next(rxs) if on_relu else next(xs)
                for m in body:
                    h = m(h)
                pre.append(h)
            z = self.bn(torch.cat(pre, 1) if len(pre) > 1 else pre[0], next(rows))
            out.append(z.unflatten(1, (len(pre), -1)).sum(1))
        for name in self.names[len(self.normed) :]:
            op, w = self.ops[name], next(rows)
            out.append(op(next(xs), w) if isinstance(op, FactorizedReduce) else self.per_edge(next(xs), w))
        return sum_all(out).unflatten(1, (self.E, self.C)).unbind(1)  # one backward kernel

    def per_edge(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """[B, C, ...] scaled by each edge's weights w [E * C]: [B, E * C, ...] (linear in h)."""
        return (h.unsqueeze(1) * w.to(h.dtype).view(1, self.E, self.C, *[1] * (h.dim() - 2))).flatten(1, 2)


def _plan(op: nn.Sequential) -> tuple[bool, tuple[nn.Module, ...]]:
    """How EdgeGroup runs a normed op: (reads the group's relu(x) repeated, its modules after that)."""
    mods = list(op)
    on_relu = isinstance(mods[0], nn.ReLU)
    skip = on_relu + (on_relu and len(mods) > 1 and isinstance(mods[1], Repeat))
    return on_relu, tuple(mods[skip:])


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
        self.reduction, self.nodes, self.multiplier, self.C = reduction, nodes, multiplier, C
        self.preprocess0 = (
            FactorizedReduce(C_pp, C, affine=False) if reduction_prev else relu_conv_bn(C_pp, C, 1, 1, 0, affine=False)
        )
        self.preprocess1 = relu_conv_bn(C_p, C, 1, 1, 0, affine=False)
        # group s: the edges reading state s (s0, s1, then the nodes but the last), to nodes first(s)..
        self.groups = nn.ModuleList(
            EdgeGroup(C, 2 if reduction and s < 2 else 1, ops, nodes - self.first(s)) for s in range(nodes + 1)
        )
        # Every weight the groups read, gathered by one index_select: for each group and op,
        # the alpha of its edges (node i <- state s: row num_edges(i) + s) C times each
        index = [
            (num_edges(i) + s) * len(ops) + ops.index(name)
            for s, g in enumerate(self.groups)
            for name in g.names
            for i in range(self.first(s), nodes)
            for _ in range(C)
        ]
        self.register_buffer("_rows", torch.tensor(index, dtype=torch.long), persistent=False)

    @staticmethod
    def first(s: int) -> int:
        """The first node that reads state s."""
        return max(0, s - 1)

    def arch_rows(self, weights: torch.Tensor) -> list[list[torch.Tensor]]:
        """Per group, the rows its forward reads (EdgeGroup.sizes): its edges' weights for
        each op (EdgeGroup.names) repeated C times."""
        flat = iter(weights.reshape(-1).index_select(0, self._rows).split([n for g in self.groups for n in g.sizes]))
        return [list(itertools.islice(flat, len(g.sizes))) for g in self.groups]

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        rows = self.arch_rows(weights)
        outs = [self.groups[s](states[s], rows[s]) for s in (0, 1)]
        for i in range(self.nodes):
            states.append(sum_all([edges[i - self.first(s)] for s, edges in enumerate(outs)]))
            if i < self.nodes - 1:
                outs.append(self.groups[2 + i](states[-1], rows[2 + i]))
        return torch.cat(states[-self.multiplier :], dim=1)

    def edge_op(self, state: int, node: int, name: str) -> nn.Module:
        """A copy of op `name` on the edge node <- state, as a module of its own (parameters
        and BN statistics sliced out of the group's): for inspecting one edge, and tests."""
        like = self.preprocess1[1].weight
        op = make_op(name, self.C, self.groups[state].stride, affine=False, search=True).to(like.device, like.dtype)
        mine, slots = self.state_dict(), self.edge_slots(state, node, name)
        with torch.no_grad():
            for k, t in op.state_dict().items():
                key, rows = slots[k]
                t.copy_(mine[key] if rows is None else mine[key][rows])
        return op

    def edge_slots(self, state: int, node: int, name: str) -> dict[str, tuple[str, slice | None]]:
        """Where each tensor of op `name` on the edge node <- state (named as in that op built
        alone, `make_op(name, C, stride)`) lives in this cell's state_dict: (key, its rows along
        dim 0; None for a scalar). The group's op holds the same tensors in the same order, E
        edges' rows each; a normed op's BN is its part of the group's BN, the edges' rows in it."""
        g, e = self.groups[state], node - self.first(state)
        if name not in g.ops:  # 'none': no tensors
            return {}
        alone = make_op(name, self.C, g.stride, affine=False, search=True).state_dict()
        held = [(f"groups.{state}.ops.{name}.{k}", t, 1, 0) for k, t in g.ops[name].state_dict().items()]
        if name in g.normed:
            parts, part = len(g.normed), g.normed.index(name)
            held += [(f"groups.{state}.bn.{k}", t, parts, part) for k, t in g.bn.state_dict().items()]
        slots = {}
        for k, (key, t, parts, part) in zip(alone, held, strict=True):
            n = len(t) // (parts * g.E) if t.dim() else 0  # one edge's rows
            slots[k] = (key, slice((part * g.E + e) * n, (part * g.E + e + 1) * n) if t.dim() else None)
        return slots


def reduction_layers(layers: int) -> tuple[int, ...]:
    """Cells at 1/3 and 2/3 of the depth reduce resolution (deduplicated for tiny nets)."""
    return tuple(sorted({layers // 3, 2 * layers // 3}))


def num_edges(nodes: int) -> int:
    return sum(2 + i for i in range(nodes))


class Supernet(nn.Module):
    """DARTS supernet: stem, `layers` search cells, global pooling, linear classifier.

    Every edge of a cell mixes all candidate ops with softmax(α) weights; α are
    `alphas_normal` / `alphas_reduce` ([num_edges(nodes), len(ops)]), returned by
    arch_parameters(), the rest by weight_parameters(); derive() gives the Genotype.

    in_channels, num_classes: of the images and of the logits.
    C: channels of the first cells (doubled at each reduction cell, at 1/3 and 2/3 of `layers`).
    layers: the number of cells; nodes: intermediate nodes per cell.
    multiplier: how many of the last nodes a cell concatenates as its output (default `nodes`).
    stem_multiplier: the stem convolution outputs stem_multiplier * C channels.
    ops: the candidate ops, a subset of PRIMITIVES with at least one other than 'none'.
    image_size: when given, checked to survive the reductions (it changes no shape).
    Raises ValueError for unknown, repeated or only-'none' ops and a too small image_size.
    """

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
        halvings = len(reduction_layers(layers))
        if image_size is not None and image_size < 2**halvings:
            raise ValueError(
                f"space: image_size {image_size} is too small for {halvings} reduction cells, each halving it; "
                f"give images of at least {2**halvings} pixels a side (distsearch pack --size N resizes a folder)"
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
        self.register_load_state_dict_pre_hook(_read_per_edge)

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


def _read_per_edge(model: Supernet, state: dict[str, torch.Tensor], prefix: str, *_: object) -> None:
    """load_state_dict pre-hook: a per-edge checkpoint (search_spaces/layout.py) in place,
    regrouped; any other left as it is."""
    mine = [k for k in state if k.startswith(prefix)]
    if not is_per_edge(k[len(prefix) :] for k in mine):
        return
    grouped = regroup(model, {k[len(prefix) :]: state.pop(k) for k in mine}, model.state_dict())
    state.update({prefix + k: v for k, v in grouped.items()})


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
