"""Linear bounds by back-substitution (CROWN, Zhang et al. 2018, Theorem 3.2; Fast-Lin,
Weng et al. 2018) through the DARTS search space, for DSRNA's certified metric (Hosseini,
Yang, Xie, CVPR 2021).

A lower bound of the specification C f(x) is carried backwards as a linear function
A z + c of the current node z (A: [B, S, *shape], c: [B, S]). Affine layers substitute
exactly (A <- A W, c <- c + A b; convolutions by their transposes, parameter-free linear
ops by their autograd adjoint). A ReLU with pre-activation bounds [lo, up] is relaxed:
positive coefficients take the lower line a z (a in {0, 1}, the CROWN-adaptive choice
a = 1 iff up > -lo), negative ones the upper chord up (z - lo) / (up - lo) (eq. 4). A max pool
is relaxed per window as max_i z_i >= z_j* (j*: the input with the largest lower bound, a
linear selection that the substitution continues through) and max_i z_i <= max_i up_i (a
constant, for negative coefficients). A mixed op is the softmax(alpha)-weighted sum of its ops, so its
linear bound is the weighted sum of the ops' bounds; cells are DAGs whose coefficients are
accumulated node by node in reverse order. The search cell's batched edges (EdgeGroup) go
back as they ran: the coefficients of all the edges reading a state side by side, each op once.

Intermediate bounds (ReLU inputs, max-pool inputs and outputs) come from the IBP pass
(bounds_ibp.py): the CROWN-IBP scheme (Zhang et al. 2020), one backward pass per network.
Full CROWN would bound every intermediate neuron by its own backward pass (one per ReLU
layer, each with a specification as wide as the layer): far too slow inside a search step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from search_spaces.darts import EdgeGroup, SearchCell, Supernet
from search_spaces.network import Cell, Network
from search_spaces.operations import FactorizedReduce, Identity, Repeat, Shift, Zero

from .bounds_ibp import CHAINS, SUPPORTED, Trace, bn_affine, chain, conv_padding

Coef = torch.Tensor | None


class Back:
    """Back-substitution state: the trace of the IBP pass and the accumulated constant."""

    def __init__(self, trace: Trace):
        self.trace = trace
        self.const: torch.Tensor | float = 0.0

    def add(self, c: torch.Tensor) -> None:
        self.const = self.const + c


def _acc(a: Coef, b: Coef) -> Coef:
    if a is None:
        return b
    return a if b is None else a + b


def _adjoint(fn, A: torch.Tensor, in_shape: torch.Size) -> torch.Tensor:
    """A -> A o fn for a parameter-free linear map fn (pools, shifts), by autograd."""
    BS = A.shape[:2]
    with torch.enable_grad():
        z = torch.zeros(BS[0] * BS[1], *in_shape, dtype=A.dtype, device=A.device, requires_grad=True)
        (g,) = torch.autograd.grad(fn(z), z, A.reshape(-1, *A.shape[2:]), create_graph=A.requires_grad)
    return g.reshape(*BS, *in_shape)


def _conv_back(m: nn.Conv2d, A: torch.Tensor, st: Back) -> torch.Tensor:
    in_shape = st.trace.shapes[id(m)]
    H_out, W_out = A.shape[-2:]
    out_pad = []
    padding = conv_padding(m)
    for n_in, n_out, s, p, d, k in zip(in_shape[1:], (H_out, W_out), m.stride, padding, m.dilation, m.kernel_size):
        out_pad.append(n_in - ((n_out - 1) * s - 2 * p + d * (k - 1) + 1))
    BS = A.shape[:2]
    A2 = F.conv_transpose2d(
        A.reshape(-1, *A.shape[2:]), m.weight, None, m.stride, padding, tuple(out_pad), m.groups, m.dilation
    )
    if m.bias is not None:
        st.add(torch.einsum("bschw,c->bs", A, m.bias))
    return A2.reshape(*BS, *in_shape)


def _relu_back(m: nn.ReLU, A: torch.Tensor, st: Back) -> torch.Tensor:
    lo, up = st.trace.bounds[id(m)]
    lo, up = lo.unsqueeze(1), up.unsqueeze(1)
    unstable = (lo < 0) & (up > 0)
    # the chord's slope on unstable units only, where up - lo > 0 exactly: a floor on the width (it
    # was 1e-12) flattened the upper line below relu(up) on ranges narrower than that (unsound)
    chord = torch.where(unstable, up / torch.where(unstable, up - lo, torch.ones_like(up)), torch.zeros_like(up))
    a_up = torch.where(up <= 0, torch.zeros_like(up), torch.where(lo >= 0, torch.ones_like(up), chord))
    a_low = torch.where(up <= 0, torch.zeros_like(up), torch.where(lo >= 0, torch.ones_like(up), (up > -lo).to(up)))
    b_up = torch.where(unstable, -chord * lo, torch.zeros_like(up))
    A_pos, A_neg = A.clamp_min(0), A.clamp_max(0)
    st.add((A_neg * b_up).flatten(2).sum(-1))
    return A_pos * a_low + A_neg * a_up


def _maxpool_back(m: nn.MaxPool2d, A: torch.Tensor, st: Back) -> torch.Tensor:
    """A max(z) >= A+ z_j* + A- up_out: A+ goes back through the selection of j*."""
    _, up_out = st.trace.bounds[id(m)]
    st.add((A.clamp_max(0) * up_out.unsqueeze(1)).flatten(2).sum(-1))
    B, S, C = A.shape[:3]
    H, W = st.trace.shapes[id(m)][-2:]
    index = st.trace.argmax[id(m)].flatten(2).unsqueeze(1).expand(B, S, C, -1)
    out = A.new_zeros(B, S, C, H * W).scatter_add(3, index, A.clamp_min(0).flatten(3))
    return out.view(B, S, C, H, W)


def back(m: nn.Module, A: Coef, st: Back) -> Coef:
    """Substitute the linear lower bound A m(z) + c into one in z; None = no dependence left."""
    if A is None:
        return None
    if isinstance(m, Supernet):
        return _supernet_back(m, A, st)
    if isinstance(m, Network):
        return _network_back(m, A, st)
    if isinstance(m, CHAINS):
        return back(chain(m), A, st)
    if isinstance(m, nn.Sequential):
        for c in reversed(list(m)):
            A = back(c, A, st)
            if A is None:
                return None
        return A
    if isinstance(m, nn.Conv2d):
        return _conv_back(m, A, st)
    if isinstance(m, nn.Linear):  # on the last axis of its input, whatever the leading ones
        if m.bias is not None:
            c = A @ m.bias
            st.add(c.flatten(2).sum(2) if c.dim() > 2 else c)  # each position adds its bias term
        return A @ m.weight
    if isinstance(m, nn.BatchNorm2d):
        s, t = bn_affine(m)
        st.add(torch.einsum("bschw,c->bs", A, t))
        return A * s.reshape(1, 1, -1, 1, 1)
    if isinstance(m, nn.ReLU):
        return _relu_back(m, A, st)
    if isinstance(m, nn.MaxPool2d):
        return _maxpool_back(m, A, st)
    if isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d, Shift)):
        return _adjoint(m, A, st.trace.shapes[id(m)])
    if isinstance(m, nn.Flatten):
        return A.reshape(*A.shape[:2], *st.trace.shapes[id(m)])
    if isinstance(m, Repeat):  # the copies' coefficients add up
        return A.unflatten(2, (m.times, -1)).sum(2)
    if isinstance(m, (Identity, nn.Identity, nn.Dropout)):
        return A
    if isinstance(m, Zero):
        return None
    if isinstance(m, FactorizedReduce):
        A = back(m.bn, A, st).unflatten(2, (m.edges, 2, -1))  # edge by edge: conv_1's, conv_2's
        a1, a2 = A[:, :, :, 0].flatten(2, 3), A[:, :, :, 1].flatten(2, 3)
        A = _acc(back(m.conv_1, a1, st), back(m.shift, back(m.conv_2, a2, st), st))
        return back(m.relu, back(m.repeat, A, st), st)
    raise ValueError(f"bounds: no linear bound rule for {type(m).__name__}; {SUPPORTED}")


def back_edge_group(g: EdgeGroup, edges: list[Coef], rows: list[torch.Tensor], st: Back) -> Coef:
    """The coefficients of the group's E edges (None: that node does not matter) back to x."""
    if all(a is None for a in edges):
        return None
    like = next(a for a in edges if a is not None)
    A = torch.stack([like.new_zeros(()).expand_as(like) if a is None else a for a in edges], 2)  # [B, S, E, C, ..]
    flat, rows = A.flatten(2, 3), iter(rows)
    on: list[Coef] = [None, None]  # on x, on the group's relu(x) repeated
    if g.plan:  # the shared BN's output: every normed op's block reads the same coefficients
        n = len(g.plan)
        An = back(g.bn, flat.repeat(1, 1, n, *[1] * (flat.dim() - 3)) * next(rows)[:, None, None], st)
        for (on_relu, body), a in zip(g.plan, An.chunk(n, dim=2)):
            for m in reversed(body):
                a = back(m, a, st)
            on[on_relu] = _acc(on[on_relu], a)
    for name in g.names[len(g.normed) :]:
        op, w = g.ops[name], next(rows)
        if isinstance(op, FactorizedReduce):
            a = back(op, flat * w[:, None, None], st)
        else:  # the adjoint of EdgeGroup.per_edge
            a = (A * w.view(1, 1, g.E, g.C, *[1] * (A.dim() - 4))).sum(2)
        on[0] = _acc(on[0], a)
    return _acc(on[0], back(g.relu, back(g.repeat, on[1], st), st))


def back_search_cell(cell: SearchCell, A: torch.Tensor, weights: torch.Tensor, st: Back) -> tuple[Coef, Coef]:
    """As SearchCell.forward, in reverse: each state once all the nodes reading it are done."""
    n = 2 + cell.nodes
    As: list[Coef] = [None] * n
    for idx, chunk in zip(range(n - cell.multiplier, n), A.chunk(cell.multiplier, dim=2)):
        As[idx] = chunk
    rows = cell.arch_rows(weights)
    for s in reversed(range(cell.nodes + 1)):
        edges = [As[2 + i] for i in range(cell.first(s), cell.nodes)]
        As[s] = _acc(As[s], back_edge_group(cell.groups[s], edges, rows[s], st))
    return back(cell.preprocess0, As[0], st), back(cell.preprocess1, As[1], st)


def back_cell(cell: Cell, A: torch.Tensor, st: Back) -> tuple[Coef, Coef]:
    n = 2 + len(cell.ops) // 2
    As: list[Coef] = [None] * n
    for idx, chunk in zip(cell.concat, A.chunk(len(cell.concat), dim=2)):
        As[idx] = _acc(As[idx], chunk)
    for node in reversed(range(len(cell.ops) // 2)):
        Ai = As[2 + node]
        if Ai is None:
            continue
        for k in (2 * node, 2 * node + 1):
            As[cell.inputs[k]] = _acc(As[cell.inputs[k]], back(cell.ops[k], Ai, st))
    return back(cell.preprocess0, As[0], st), back(cell.preprocess1, As[1], st)


def _cells_back(m: nn.Module, A: torch.Tensor, st: Back, cell_back) -> Coef:
    """Head, then the cells in reverse: cell k reads outputs k-2 and k-1 (-1 = the stem)."""
    A = back(m.classifier, A, st)
    A = back(m.global_pooling, A.reshape(*A.shape, 1, 1), st)
    L = len(m.cells)
    outs: dict[int, Coef] = {L - 1: A}
    for k in reversed(range(L)):
        a0, a1 = cell_back(m.cells[k], outs.pop(k, None))
        outs[max(k - 2, -1)] = _acc(outs.get(max(k - 2, -1)), a0)
        outs[max(k - 1, -1)] = _acc(outs.get(max(k - 1, -1)), a1)
    return outs[-1]


def _supernet_back(m: Supernet, A: torch.Tensor, st: Back) -> Coef:
    w_normal, w_reduce = m.arch_weights()

    def cell_back(cell: SearchCell, Ak: Coef) -> tuple[Coef, Coef]:
        if Ak is None:
            return None, None
        return back_search_cell(cell, Ak, w_reduce if cell.reduction else w_normal, st)

    return back(m.stem, _cells_back(m, A, st, cell_back), st)


def _network_back(m: Network, A: torch.Tensor, st: Back) -> Coef:
    def cell_back(cell: Cell, Ak: Coef) -> tuple[Coef, Coef]:
        return (None, None) if Ak is None else back_cell(cell, Ak, st)

    return back(m.first_layer, back(m.stem_bn, _cells_back(m, A, st, cell_back), st), st)
