"""The DARTS cell search space and supernet (Liu et al., ICLR 2019, eqs. 1-2 and section 2.4).

Mixed op (eq. 2): o_bar(x) = sum_o softmax(alpha)_o * o(x). Each intermediate node sums
the mixed ops of all earlier nodes; the cell output concatenates the last `multiplier`
intermediates. Architecture weights (normal, reduce) are kept apart from the network
weights: `arch_parameters()` / `weight_parameters()`. All mixed-op arithmetic lives in
`MixedOp.forward`, the one place to batch candidate ops later.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .genotype import Genotype
from .operations import PRIMITIVES, FactorizedReduce, Zero, make_op, relu_conv_bn


class MixedOp(nn.Module):
    def __init__(self, C: int, stride: int, ops: tuple[str, ...]):
        super().__init__()
        self.ops = nn.ModuleList(make_op(name, C, stride, affine=False, search=True) for name in ops)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # 'none' adds w * 0: skipping it gives bitwise the same output and gradients (its
        # alpha still enters the softmax) and saves three kernels per edge and pass.
        return sum(w * op(x) for w, op in zip(weights, self.ops) if not isinstance(op, Zero))


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
        for i in range(nodes):
            for j in range(2 + i):
                stride = 2 if reduction and j < 2 else 1
                self.edges.append(MixedOp(C, stride, ops))

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self.nodes):
            s = sum(self.edges[offset + j](h, weights[offset + j]) for j, h in enumerate(states))
            offset += len(states)
            states.append(s)
        return torch.cat(states[-self.multiplier :], dim=1)


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
        self.stem = nn.Sequential(nn.Conv2d(in_channels, C_curr, 3, padding=1, bias=False), nn.BatchNorm2d(C_curr))
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
