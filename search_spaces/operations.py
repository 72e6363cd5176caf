"""The eight DARTS candidate operations (Liu et al., ICLR 2019, section 3 / appendix A).

Every op is built from plain torch primitives (ReLU, Conv2d, BatchNorm2d, pools) in
`nn.Sequential` form, plus small structural modules (`Zero`, `Identity`, `Shift`, `Repeat`,
`FactorizedReduce`), so bound propagation (distsearch/robust/bounds.py) can walk any op
without special knowledge of it. `make_op(..., edges=E)` builds E independent copies of an op
side by side, for the search cell's batched edges (darts.py, EdgeGroup). The BatchNorm2d here
can scale its output (the mixed op's weight, folded into the BN kernel); it and
DepthwiseConv2d differentiate twice cheaply (double_backward.py). Ops take dtype and memory
format from their input.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import double_backward
from .pattern import MaxPool2d, ReLU

PRIMITIVES: tuple[str, ...] = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)


class BatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d that can scale its output, `bn(x, scale) = scale * bn(x)`, inside the BN
    kernel (the mixed op's softmax(alpha) weight, search_spaces/darts.py), and that does not
    count batches: `num_batches_tracked` is only read when momentum is None (then it counts as
    usual); counting costs one kernel launch per call, 1,858 per DARTS search step.

    `split = (n, mean, var)` (set by the DSRNA searcher's `split_batch_norm`) runs two batches
    in one: the first n examples as the module's mode says (in train mode: batch statistics,
    running ones updated), the rest frozen to the statistics (mean, var)."""

    split: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        scale = None if scale is None else scale.expand(self.num_features)
        if self.momentum is None:
            out = super().forward(x)
            return out if scale is None else out * scale.view(1, -1, *[1] * (x.dim() - 2))
        weight, bias = self.weight, self.bias
        if scale is not None:
            weight, bias = (scale, None) if weight is None else (weight * scale, bias * scale)
        if self.split is not None:
            n, mean, var = self.split
            head, tail = x.split([n, x.shape[0] - n])  # backward: one cat of the two gradients
            head = F.batch_norm(
                head, self.running_mean, self.running_var, weight, bias, self.training, self.momentum, self.eps
            )
            return torch.cat([head, F.batch_norm(tail, mean, var, weight, bias, False, 0.0, self.eps)])
        stats = self.training or self.running_mean is None
        if not stats and double_backward.marked(x):
            return double_backward.FrozenBatchNorm.apply(x, self.running_mean, self.running_var, weight, bias, self.eps)
        return F.batch_norm(x, self.running_mean, self.running_var, weight, bias, stats, self.momentum, self.eps)


class DepthwiseConv2d(nn.Conv2d):
    """nn.Conv2d for groups = in_channels with a cheap double backward inside
    double_backward.differentiated_twice(); elsewhere, or when not depthwise, plain nn.Conv2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        depthwise = self.groups == self.in_channels and self.bias is None and self.padding_mode == "zeros"
        if not (depthwise and double_backward.depthwise_applies(x)) or isinstance(self.padding, str):
            return super().forward(x)
        conf = list(self.stride), list(self.padding), list(self.dilation)
        return double_backward.DepthwiseConv.apply(x, self.weight, *conf)


class Zero(nn.Module):
    """The 'none' op: zeros of the output shape (stride 2 halves height and width)."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return x.mul(0.0)
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Shift(nn.Module):
    """Shift by one pixel right/down with zero padding, keeping the size (x[i+1, j+1])."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (-1, 1, -1, 1))  # crop the first row and column, pad the last: one kernel


def nhwc(x: torch.Tensor) -> bool:
    """Whether x is laid out channels_last (and not also plain contiguous)."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


class Repeat(nn.Module):
    """x repeated `times` along the channels: one copy per edge of the search cell's batched
    edges (darts.EdgeGroup); its backward sums the copies' gradients in one kernel."""

    def __init__(self, times: int):
        super().__init__()
        self.times = times

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.times == 1:
            return x
        if nhwc(x):  # stays NHWC
            return x.permute(0, 2, 3, 1).repeat(1, 1, 1, self.times).permute(0, 3, 1, 2)
        return x.repeat(1, self.times, 1, 1)


class FactorizedReduce(nn.Module):
    """Halve the resolution with two offset stride-2 1x1 convs, concatenated, then BN.

    Unlike the reference code, the second path pads before shifting, so odd sizes (7x7 on
    MNIST after two reductions) work too. With `edges` = E > 1, E independent copies side by
    side (the search cell's batched edges): relu(x) repeated E times, outputs edge by edge,
    each edge's output its conv_1 half then its conv_2 half (`interleave`).
    """

    def __init__(self, C_in: int, C_out: int, affine: bool = True, edges: int = 1):
        super().__init__()
        assert C_out % 2 == 0, "FactorizedReduce needs an even number of output channels"
        self.edges = edges
        self.relu = ReLU(inplace=False)
        self.shift = Shift()
        E = edges
        self.repeat = Repeat(edges)
        self.conv_1 = nn.Conv2d(E * C_in, E * C_out // 2, 1, stride=2, padding=0, bias=False, groups=E)
        self.conv_2 = nn.Conv2d(E * C_in, E * C_out // 2, 1, stride=2, padding=0, bias=False, groups=E)
        self.bn = BatchNorm2d(E * C_out, affine=affine)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """scale * FR(x), the scale folded into the BN."""
        rx = self.repeat(self.relu(x))
        return self.bn(self.interleave(self.conv_1(rx), self.conv_2(self.shift(rx))), scale)

    def interleave(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Edge by edge, a's channels then b's (torch.cat([a, b], 1) for one edge); NHWC stays NHWC."""
        c = 1
        if nhwc(a):
            a, b, c = a.permute(0, 2, 3, 1), b.permute(0, 2, 3, 1), 3
        out = torch.stack([a.unflatten(c, (self.edges, -1)), b.unflatten(c, (self.edges, -1))], c + 1).flatten(c, c + 2)
        return out if c == 1 else out.permute(0, 3, 1, 2)


def relu_conv_bn(C_in: int, C_out: int, kernel: int, stride: int, padding: int, affine: bool = True) -> nn.Sequential:
    return nn.Sequential(
        ReLU(inplace=False),
        nn.Conv2d(C_in, C_out, kernel, stride=stride, padding=padding, bias=False),
        BatchNorm2d(C_out, affine=affine),
    )


def dil_conv(
    C_in: int,
    C_out: int,
    kernel: int,
    stride: int,
    padding: int,
    dilation: int,
    affine: bool = True,
    edges: int = 1,
    repeat: bool = True,
) -> nn.Sequential:
    """ReLU, depthwise conv, 1x1 conv, BN; `edges` = E > 1: E independent copies side by side
    (relu(x) repeated E times unless `repeat` is False, channels edge by edge, the 1x1 conv
    grouped by edge)."""
    E = edges
    return nn.Sequential(
        ReLU(inplace=False),
        *([Repeat(E)] if E > 1 and repeat else []),
        DepthwiseConv2d(E * C_in, E * C_in, kernel, stride, padding, dilation=dilation, groups=E * C_in, bias=False),
        nn.Conv2d(E * C_in, E * C_out, 1, bias=False, groups=E),
        BatchNorm2d(E * C_out, affine=affine),
    )


def sep_conv(
    C_in: int, C_out: int, kernel: int, stride: int, padding: int, affine: bool = True, edges: int = 1
) -> nn.Sequential:
    """Two stacked depthwise-separable convs (the DARTS SepConv), flattened into one Sequential."""
    return nn.Sequential(
        *dil_conv(C_in, C_in, kernel, stride, padding, 1, affine, edges),
        *dil_conv(C_in, C_out, kernel, 1, padding, 1, affine, edges, repeat=False),  # reads E * C already
    )


def _pool(kind: str, C: int, stride: int, affine: bool, bn: bool, edges: int = 1) -> nn.Module:
    pool = (
        MaxPool2d(3, stride=stride, padding=1)
        if kind == "max"
        else nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)
    )
    # In the search space DARTS follows each pool by a parameter-free BN so its scale
    # matches the convolutions' (model_search.py, MixedOp).
    # With edges = E > 1 the pool runs once and its output is copied per edge before the BN.
    if not bn:
        return nn.Sequential(pool)
    return nn.Sequential(pool, *([Repeat(edges)] if edges > 1 else []), BatchNorm2d(edges * C, affine=False))


OpFactory = Callable[[int, int, bool, bool, int], nn.Module]

# name -> factory(C, stride, affine, search, edges): `search` adds the pool BN of the supernet;
# `edges` = E > 1 builds E independent copies of the op side by side, from C input channels to E * C
# output channels edge by edge (the search cell's batched edges); the identity stays one (the
# cell scales it per edge).
OPS: dict[str, OpFactory] = {
    "none": lambda C, stride, affine, search, edges: Zero(stride),
    "max_pool_3x3": lambda C, stride, affine, search, edges: _pool("max", C, stride, affine, search, edges),
    "avg_pool_3x3": lambda C, stride, affine, search, edges: _pool("avg", C, stride, affine, search, edges),
    "skip_connect": lambda C, stride, affine, search, edges: (
        Identity() if stride == 1 else FactorizedReduce(C, C, affine, edges)
    ),
    "sep_conv_3x3": lambda C, stride, affine, search, edges: sep_conv(C, C, 3, stride, 1, affine, edges),
    "sep_conv_5x5": lambda C, stride, affine, search, edges: sep_conv(C, C, 5, stride, 2, affine, edges),
    "dil_conv_3x3": lambda C, stride, affine, search, edges: dil_conv(C, C, 3, stride, 2, 2, affine, edges),
    "dil_conv_5x5": lambda C, stride, affine, search, edges: dil_conv(C, C, 5, stride, 4, 2, affine, edges),
}


def make_op(name: str, C: int, stride: int, affine: bool = True, search: bool = False, edges: int = 1) -> nn.Module:
    if name not in OPS:
        raise ValueError(f"unknown op {name!r}; known ops: {', '.join(OPS)}")
    return OPS[name](C, stride, affine, search, edges)
