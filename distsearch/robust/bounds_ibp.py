"""Interval bound propagation (IBP; Gowal et al. 2018, eqs. 5-6) through every op of the
DARTS search space, for the DSRNA certified metric (Hosseini, Yang, Xie, CVPR 2021).

For a box [lo, up] with centre m = (up + lo) / 2 and radius r = (up - lo) / 2, an affine map
z = W x + b gives the box W m + b +- |W| r (eq. 6); monotone maps (ReLU, max pooling) act on
lo and up separately; linear maps with nonnegative coefficients (average pooling, shifts,
positive weighted sums) on either form. A Box keeps the form it was made in and derives the
other on first use, so runs of affine maps and sums stay in (m, r). A mixed op (DARTS eq. 2)
is the softmax(alpha)-weighted sum of its ops, and the weights are positive, so its box is the
weighted sum of the ops' boxes: every bound stays differentiable in alpha. The search cell's
batched edges (search_spaces/darts.py, EdgeGroup) are walked as they run: each op once for
all the edges reading a state, the boxes taken apart per edge only for the node sums.

BatchNorm is always the affine map of its *running* statistics (eval-mode semantics), even
when the module is in training mode: the bounded function is the eval-mode network (drop
path off). The DSRNA searcher swaps in the clean batch's statistics when it wants the
training-mode function (search/dsrna.py, `frozen_bn`).

The pass records, for the linear back-substitution of bounds_linear.py, the input bounds of
every ReLU, the output bounds of every max pool and the input shape of every leaf module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from search_spaces.darts import EdgeGroup, SearchCell, Supernet, sum_all
from search_spaces.network import Cell, Network
from search_spaces.operations import FactorizedReduce, Identity, Repeat, Shift, Zero

from .models import MLP, SmallCNN


class Box:
    """Elementwise bounds lo <= z <= up, held as (lo, up) or as centre and radius (mid, rad):
    affine maps read and give (mid, rad), monotone ones (lo, up), and either form is derived
    from the other once, on first use, so chains of affine maps and sums convert nothing.
    `center`/`eps` (set only on the raw input of an L2 ball, kept through reshapes) let the
    first affine layer use the exact L2 dual norm."""

    def __init__(
        self,
        lo: torch.Tensor | None = None,
        up: torch.Tensor | None = None,
        center: torch.Tensor | None = None,
        eps: torch.Tensor | None = None,
        *,
        mid: torch.Tensor | None = None,
        rad: torch.Tensor | None = None,
    ):
        if (lo is None or up is None) and (mid is None or rad is None):
            raise ValueError("Box needs (lo, up) or (mid, rad)")
        self._lo, self._up, self._mid, self._rad = lo, up, mid, rad
        self.center, self.eps = center, eps

    @property
    def lo(self) -> torch.Tensor:
        if self._lo is None:
            self._lo = self._mid - self._rad
        return self._lo

    @property
    def up(self) -> torch.Tensor:
        if self._up is None:
            self._up = self._mid + self._rad
        return self._up

    @property
    def mid(self) -> torch.Tensor:
        if self._mid is None:
            self._mid = torch.lerp(self._lo, self._up, 0.5)  # up - (up - lo) / 2: one kernel
        return self._mid

    @property
    def rad(self) -> torch.Tensor:
        if self._rad is None:
            self._rad = self._up - self.mid  # >= 0: mid = up - (a nonnegative number) rounded down
        return self._rad

    @property
    def shape(self) -> torch.Size:
        return (self._lo if self._lo is not None else self._mid).shape

    @property
    def centred(self) -> bool:
        """Whether (mid, rad) are at hand."""
        return self._mid is not None

    def unbind(self, dim: int) -> list[Box]:
        """The boxes of t.unbind(dim), every form at hand split alike."""
        forms = [None if t is None else t.unbind(dim) for t in (self._lo, self._up, self._mid, self._rad)]
        n = next(len(f) for f in forms if f is not None)
        boxes = []
        for k in range(n):
            box = Box.__new__(Box)
            box._lo, box._up, box._mid, box._rad = (None if f is None else f[k] for f in forms)
            box.center, box.eps = None, self.eps
            boxes.append(box)
        return boxes

    def each(self, fn) -> Box:  # noqa: ANN001 - a reshape
        """The box through the reshape `fn`, applied to every form at hand and to the L2 centre."""
        app = lambda t: None if t is None else fn(t)
        box = Box.__new__(Box)
        box._lo, box._up, box._mid, box._rad = app(self._lo), app(self._up), app(self._mid), app(self._rad)
        box.center, box.eps = app(self.center), self.eps
        return box


@dataclass
class Trace:
    """What the IBP pass records for the linear pass, keyed by id(module)."""

    bounds: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    shapes: dict[int, torch.Size] = field(default_factory=dict)
    argmax: dict[int, torch.Tensor] = field(default_factory=dict)  # max pools: the largest lower bound

    def put(self, m: nn.Module, lo: torch.Tensor, up: torch.Tensor) -> None:
        if id(m) in self.bounds:
            raise ValueError(f"bounds: module {type(m).__name__} is called twice in one forward; not supported")
        self.bounds[id(m)] = (lo, up)


def bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) of a BatchNorm2d with its running statistics."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("bounds: BatchNorm2d without running statistics (track_running_stats=False)")
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def _bn(m: nn.BatchNorm2d, box: Box, scale: torch.Tensor | None = None) -> Box:
    """scale * m(z) over the box, with m's running statistics (scale >= 0, per channel): the
    centre and the radius each through one eval-mode batch norm (one kernel each way), the
    radius with mean 0 and |weight|."""
    if m.running_mean is None or m.running_var is None:
        raise ValueError("bounds: BatchNorm2d without running statistics (track_running_stats=False)")
    weight, bias = m.weight, m.bias
    if scale is not None:
        weight, bias = (scale, None) if weight is None else (weight * scale, bias * scale)
    mid = F.batch_norm(box.mid, m.running_mean, m.running_var, weight, bias, False, 0.0, m.eps)
    w_abs = weight if m.weight is None else weight.abs()
    rad = F.batch_norm(box.rad, _zeros(m.running_mean), m.running_var, w_abs, None, False, 0.0, m.eps)
    return Box(mid=mid, rad=rad)


_ZEROS: dict[tuple, torch.Tensor] = {}


def _zeros(like: torch.Tensor) -> torch.Tensor:
    """A zero tensor like `like`, made once per shape, dtype and device (read only); never
    kept from inside a CUDA graph capture (there it would be filled only on replay)."""
    key = (like.shape, like.dtype, like.device)
    if key not in _ZEROS:
        if like.is_cuda and torch.cuda.is_current_stream_capturing():
            return torch.zeros_like(like)
        _ZEROS[key] = torch.zeros_like(like)
    return _ZEROS[key]


def _affine(fn, fn_abs, box: Box, l2_rad=None) -> Box:
    c, rad = fn(box.mid), fn_abs(box.rad)
    if box.center is None or l2_rad is None:
        return Box(mid=c, rad=rad)
    c2, rad2 = fn(box.center), l2_rad()
    e = box.eps.reshape(-1, *[1] * (c2.dim() - 1))
    return Box(torch.maximum(c - rad, c2 - e * rad2), torch.minimum(c + rad, c2 + e * rad2))


def conv_padding(m: nn.Conv2d) -> tuple[int, ...]:
    """m's zero padding as numbers ('valid', symmetric 'same'); other padding modes refused."""
    if m.padding_mode != "zeros":
        raise ValueError(f"bounds: Conv2d with padding_mode={m.padding_mode!r}; only zero padding is supported")
    if m.padding == "valid":
        return (0,) * len(m.kernel_size)
    if m.padding == "same":
        total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
        if any(t % 2 for t in total):
            raise ValueError("bounds: Conv2d with padding='same' and an even kernel (asymmetric); pad explicitly")
        return tuple(t // 2 for t in total)
    return tuple(m.padding)


def _conv(m: nn.Conv2d, box: Box) -> Box:
    kw = dict(stride=m.stride, padding=conv_padding(m), dilation=m.dilation, groups=m.groups)
    fn = lambda z: F.conv2d(z, m.weight, m.bias, **kw)
    fn_abs = lambda z: F.conv2d(z, m.weight.abs(), None, **kw)
    # exact L2 norm of each output unit's row (border taps that fall on padding excluded)
    l2 = lambda: F.conv2d(box.mid.new_ones((1, *box.shape[1:])), m.weight.square(), None, **kw).clamp_min(0).sqrt()
    return _affine(fn, fn_abs, box, l2)


def _linear(m: nn.Linear, box: Box) -> Box:
    fn = lambda z: F.linear(z, m.weight, m.bias)
    fn_abs = lambda z: F.linear(z, m.weight.abs())
    return _affine(fn, fn_abs, box, lambda: m.weight.norm(dim=1))


def spec_linear(weight: torch.Tensor, bias: torch.Tensor | None, C: torch.Tensor, box: Box) -> Box:
    """Bounds of C (W h + b) for h in the box: C [B, S, K] folded into W (tighter than C after W)."""
    W = C @ weight  # [B, S, F]
    m, r = box.mid, box.rad
    c = torch.einsum("bsf,bf->bs", W, m)
    if bias is not None:
        c = c + C @ bias
    rad = torch.einsum("bsf,bf->bs", W.abs(), r)
    lo, up = c - rad, c + rad
    if box.center is not None:
        c2 = torch.einsum("bsf,bf->bs", W, box.center) + (C @ bias if bias is not None else 0)
        rad2 = box.eps.reshape(-1, 1) * W.norm(dim=-1)
        lo, up = torch.maximum(lo, c2 - rad2), torch.minimum(up, c2 + rad2)
    return Box(lo, up)


def _monotone(fn, box: Box) -> Box:
    return Box(fn(box.lo), fn(box.up))


def ibp(m: nn.Module, box: Box, trace: Trace, *, skip_head: bool = False) -> Box:
    """Propagate `box` through module `m` (any op of search_spaces, or a small Sequential)."""
    if isinstance(m, Supernet):
        return _supernet(m, box, trace, skip_head)
    if isinstance(m, Network):
        return _network(m, box, trace, skip_head)
    if isinstance(m, CHAINS):
        return ibp(chain(m), box, trace, skip_head=skip_head)
    if isinstance(m, nn.Sequential):
        children = list(m)
        if skip_head:
            children = children[:-1]
        for c in children:
            box = ibp(c, box, trace)
        return box
    if trace.shapes.setdefault(id(m), box.shape[1:]) != box.shape[1:]:
        raise ValueError(
            f"bounds: module {type(m).__name__} is called on inputs of two sizes in one forward; not supported "
            "(use one module per call)"
        )
    if isinstance(m, nn.Conv2d):
        return _conv(m, box)
    if isinstance(m, nn.Linear):
        return _linear(m, box)
    if isinstance(m, nn.BatchNorm2d):
        return _bn(m, box)
    if isinstance(m, nn.ReLU):
        trace.put(m, box.lo, box.up)
        return Box(F.relu(box.lo), F.relu(box.up))
    if isinstance(m, nn.MaxPool2d):
        if m.return_indices:
            raise ValueError("bounds: MaxPool2d with return_indices=True (a pair, not a tensor); not supported")
        out = _monotone(m, box)
        trace.put(m, out.lo, out.up)
        with torch.no_grad():  # per window, the input with the largest lower bound
            _, trace.argmax[id(m)] = F.max_pool2d(
                box.lo, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, return_indices=True
            )
        return out
    if isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d, Shift)):  # linear, nonnegative coefficients
        return _join([box], lambda ts: m(ts[0]))
    if isinstance(m, (Identity, nn.Identity, nn.Dropout)):
        return box
    if isinstance(m, nn.Flatten):
        return box.each(m)
    if isinstance(m, Repeat):  # copies: ||repeat(d)||_2 > ||d||_2, so the exact L2 ball is dropped
        box = box.each(m)
        box.center = None
        return box
    if isinstance(m, Zero):
        z = m(box.lo)
        return Box(z, z)
    if isinstance(m, FactorizedReduce):
        h = ibp(m.repeat, ibp(m.relu, box, trace), trace)
        a, b = ibp(m.conv_1, h, trace), ibp(m.conv_2, ibp(m.shift, h, trace), trace)
        return ibp(m.bn, _join([a, b], lambda ts: m.interleave(*ts)), trace)
    raise ValueError(f"bounds: no bound propagation rule for {type(m).__name__}; {SUPPORTED}")


def ibp_edge_group(g: EdgeGroup, box: Box, rows: list[torch.Tensor], trace: Trace) -> list[Box]:
    """As EdgeGroup.forward: per edge, the sum of the ops' boxes scaled by their softmax(alpha)
    weights (> 0, so the boxes of a sum add); 'none' contributes nothing."""
    rows, out = iter(rows), []
    if g.plan:
        rbox = ibp(g.repeat, ibp(g.relu, box, trace), trace) if any(on for on, _ in g.plan) else None
        pre = []
        for on_relu, body in g.plan:
            b = rbox if on_relu else box
            for m in body:
                b = ibp(m, b, trace)
            pre.append(b)
        z = _bn(g.bn, _cat(pre), next(rows))
        per_op = lambda t: t.unflatten(1, (len(pre), -1)).sum(1)  # noqa: E731
        out.append(Box(mid=per_op(z.mid), rad=per_op(z.rad)))
    for name in g.names[len(g.normed) :]:
        op, w = g.ops[name], next(rows)
        if isinstance(op, FactorizedReduce):
            b, w = ibp(op, box, trace), w[:, None, None]
            out.append(Box(mid=w * b.mid, rad=w * b.rad))
        else:
            out.append(Box(mid=g.per_edge(box.mid, w), rad=g.per_edge(box.rad, w)))
    return _sum(out).each(lambda t: t.unflatten(1, (g.E, g.C))).unbind(1)


def _join(boxes: list[Box], fn) -> Box:  # noqa: ANN001 - linear with nonnegative coefficients
    """fn (sum, concatenation, average pooling) applied to the boxes' centres and radii when
    all have them at hand, else to their lower and upper bounds."""
    if all(b.centred for b in boxes):
        return Box(mid=fn([b.mid for b in boxes]), rad=fn([b.rad for b in boxes]))
    return Box(fn([b.lo for b in boxes]), fn([b.up for b in boxes]))


def _sum(boxes: list[Box]) -> Box:
    return _join(boxes, sum_all)


def _cat(boxes: list[Box]) -> Box:
    return _join(boxes, lambda ts: torch.cat(ts, 1))


def ibp_search_cell(cell: SearchCell, b0: Box, b1: Box, weights: torch.Tensor, trace: Trace) -> Box:
    """As SearchCell.forward."""
    states = [ibp(cell.preprocess0, b0, trace), ibp(cell.preprocess1, b1, trace)]
    rows = cell.arch_rows(weights)
    outs = [ibp_edge_group(cell.groups[s], states[s], rows[s], trace) for s in (0, 1)]
    for i in range(cell.nodes):
        states.append(_sum([edges[i - cell.first(s)] for s, edges in enumerate(outs)]))
        if i < cell.nodes - 1:
            outs.append(ibp_edge_group(cell.groups[2 + i], states[-1], rows[2 + i], trace))
    return _cat(states[-cell.multiplier :])


def ibp_cell(cell: Cell, b0: Box, b1: Box, trace: Trace) -> Box:
    states = [ibp(cell.preprocess0, b0, trace), ibp(cell.preprocess1, b1, trace)]
    for n in range(len(cell.ops) // 2):
        states.append(_sum([ibp(cell.ops[k], states[cell.inputs[k]], trace) for k in (2 * n, 2 * n + 1)]))
    return _cat([states[i] for i in cell.concat])


def _head(m: nn.Module, feat: Box, trace: Trace, skip_head: bool) -> Box:
    feat = ibp(m.global_pooling, feat, trace)
    feat = feat.each(lambda t: t.flatten(1))
    return feat if skip_head else ibp(m.classifier, feat, trace)


def _supernet(m: Supernet, box: Box, trace: Trace, skip_head: bool) -> Box:
    w_normal, w_reduce = m.arch_weights()
    s0 = s1 = ibp(m.stem, box, trace)
    for cell in m.cells:
        s0, s1 = s1, ibp_search_cell(cell, s0, s1, w_reduce if cell.reduction else w_normal, trace)
    return _head(m, s1, trace, skip_head)


def _network(m: Network, box: Box, trace: Trace, skip_head: bool) -> Box:
    s0 = s1 = ibp(m.stem_bn, ibp(m.first_layer, box, trace), trace)
    for cell in m.cells:
        s0, s1 = s1, ibp_cell(cell, s0, s1, trace)
    return _head(m, s1, trace, skip_head)


SUPPORTED = (
    "supported: Supernet, a genotype's Network, small_cnn, mlp and nn.Sequential of Conv2d, Linear, "
    "BatchNorm2d, ReLU, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, Flatten, Dropout and the search space's ops"
)


CHAINS = (SmallCNN, MLP)


def chain(m: nn.Module) -> nn.Sequential:
    """robust/models.py's small_cnn and mlp (first_layer, then the Sequential rest) as one
    Sequential of the same modules."""
    return nn.Sequential(m.first_layer, *m.rest)


def head_of(m: nn.Module) -> nn.Linear | None:
    """The final Linear layer that a specification matrix C can be folded into."""
    if isinstance(m, CHAINS):
        return head_of(chain(m))
    if isinstance(m, (Supernet, Network)):
        return m.classifier
    if isinstance(m, nn.Sequential) and len(m) and isinstance(m[-1], nn.Linear):
        return m[-1]
    return None
