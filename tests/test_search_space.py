import json

import pytest
import torch

from search_spaces import PRIMITIVES, Genotype, GenotypeError, Network, Supernet, num_edges
from search_spaces.operations import make_op


@pytest.mark.parametrize("shape,layers", [((1, 28, 28), 3), ((3, 32, 32), 3), ((1, 8, 8), 2)])
def test_supernet_shapes(shape, layers):
    m = Supernet(shape[0], 10, C=2, layers=layers, nodes=2, image_size=shape[-1])
    out = m(torch.rand(2, *shape))
    assert out.shape == (2, 10)
    assert m.alphas_normal.shape == (num_edges(2), len(PRIMITIVES))


def test_arch_and_weight_parameters_are_disjoint_and_complete():
    m = Supernet(1, 10, C=2, layers=2, nodes=2)
    arch, weights = m.arch_parameters(), m.weight_parameters()
    ids_a, ids_w = {id(p) for p in arch}, {id(p) for p in weights}
    assert not ids_a & ids_w
    assert ids_a | ids_w == {id(p) for p in m.parameters()}
    assert len(arch) == 2


@pytest.mark.parametrize("name", PRIMITIVES)
@pytest.mark.parametrize("stride,size", [(1, 7), (2, 7), (2, 8)])
def test_every_op_keeps_channels_and_halves_on_stride_2(name, stride, size):
    op = make_op(name, 4, stride, search=True)
    out = op(torch.rand(2, 4, size, size))
    assert out.shape == (2, 4, (size + 1) // 2 if stride == 2 else size, (size + 1) // 2 if stride == 2 else size)


def test_derive_follows_the_darts_rule():
    ops = ("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3")
    m = Supernet(1, 10, C=2, layers=2, nodes=2, ops=ops)
    with torch.no_grad():
        a = torch.zeros(num_edges(2), len(ops))
        # node 0 (edges 0,1): edge 1 prefers sep_conv strongly, edge 0 skip; 'none' is huge but excluded
        a[0] = torch.tensor([9.0, 0.0, 2.0, 0.0])
        a[1] = torch.tensor([9.0, 0.0, 0.0, 3.0])
        # node 1 (edges 2,3,4): strongest inputs are 4 (max_pool) and 2 (sep_conv)
        a[2] = torch.tensor([0.0, 0.0, 0.0, 1.5])
        a[3] = torch.tensor([0.0, 0.5, 0.0, 0.0])
        a[4] = torch.tensor([0.0, 2.5, 0.0, 0.0])
        m.alphas_normal.copy_(a)
        m.alphas_reduce.copy_(a.flip(1))
    g = m.derive()
    assert g.normal == (("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("max_pool_3x3", 2))
    assert g.normal_concat == (2, 3)
    # from alphas_reduce (ops reversed): node 0 takes sep_conv on both inputs; node 1 the two
    # strongest edges, 2 and 1 (skip, 2.5 and 0.5), not edge 0 whose only large weight is 'none'
    assert g.reduce == (("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("skip_connect", 1), ("skip_connect", 2))


def test_genotype_json_round_trip_and_network():
    g = Supernet(1, 10, C=2, layers=3, nodes=3).derive()
    again = Genotype.from_json(g.to_json())
    assert again == g
    assert json.loads(g.to_json())["normal_concat"] == [2, 3, 4]
    net = Network(again, in_channels=1, num_classes=10, C=4, layers=3, auxiliary=True, drop_path_prob=0.2)
    net.train()
    assert net(torch.rand(2, 1, 28, 28)).shape == (2, 10) and net.aux_logits.shape == (2, 10)
    net.eval()
    assert net(torch.rand(2, 1, 28, 28)).shape == (2, 10) and net.aux_logits is None


GOOD = {
    "normal": [["sep_conv_3x3", 0], ["skip_connect", 1]],
    "normal_concat": [2],
    "reduce": [["max_pool_3x3", 0], ["avg_pool_3x3", 1]],
    "reduce_concat": [2],
}


@pytest.mark.parametrize(
    "patch,match",
    [
        ({"normal": [["conv_9x9", 0], ["skip_connect", 1]]}, r"normal\[0\]: unknown op 'conv_9x9'"),
        ({"normal": [["none", 0], ["skip_connect", 1]]}, r"unknown op 'none'"),
        ({"reduce": [["max_pool_3x3", 0], ["avg_pool_3x3", 2]]}, r"reduce\[1\]: input 2 is not an earlier node"),
        ({"normal": [["sep_conv_3x3", 0]]}, r"2 edges per node"),
        ({"normal_concat": [5]}, r"normal_concat"),
        ({"normal_concat": 2}, r"normal_concat: expected a list"),
        ({"normal_concat": []}, r"normal_concat: \[\] must name distinct nodes"),
        ({"reduce_concat": [2, 2]}, r"reduce_concat: \[2, 2\] must name distinct nodes"),
        ({"extra": 1}, r"unknown \['extra'\]"),
    ],
)
def test_bad_genotypes_are_rejected_with_the_field(patch, match):
    with pytest.raises(GenotypeError, match=match):
        Genotype.from_dict({**GOOD, **patch})
    Genotype.from_dict(GOOD)  # the unpatched one is fine


def test_bad_space_rejected():
    with pytest.raises(ValueError, match="space.ops"):
        Supernet(ops=("none", "conv_9x9"))
    with pytest.raises(ValueError, match="image_size"):
        Supernet(layers=8, image_size=2)


@pytest.mark.parametrize(("reduction", "train"), [(False, True), (True, True), (True, False)])
def test_search_cell_equals_the_op_by_op_cell_to_second_derivatives(reduction, train):
    """The cell (each op run once for all the edges that read a state, weights folded into
    the BNs, states fanned out to their readers) has the value, gradients, second derivatives
    and BN running statistics of the plain cell: every node the sum over its edges and all
    ops, 'none' included, of softmax(alpha) * op(state), each edge's op a module of its own."""
    import copy

    from search_spaces import SearchCell

    torch.manual_seed(0)
    cell = SearchCell(3, 3, 5, 6, 4, reduction, False, PRIMITIVES).double().train(train)
    pre = copy.deepcopy([cell.preprocess0, cell.preprocess1])
    edges = {(i, s): [cell.edge_op(s, i, o).train(train) for o in PRIMITIVES] for i in range(3) for s in range(2 + i)}
    s0, s1 = (torch.rand(2, c, 6, 6, dtype=torch.float64, requires_grad=True) for c in (5, 6))
    a = torch.randn(9, len(PRIMITIVES), dtype=torch.float64, requires_grad=True)

    def plain(s0, s1, w):
        states, row = [pre[0](s0), pre[1](s1)], 0
        for i in range(3):
            node = 0
            for s, h in enumerate(list(states)):
                node = node + sum(wi * o(h) for wi, o in zip(w[row], edges[i, s]))
                row += 1
            states.append(node)
        return torch.cat(states[-3:], dim=1)

    def derivatives(f, params):
        out = f(s0, s1, torch.softmax(a, -1))
        g0, g1 = torch.autograd.grad(out.sin().sum(), (s0, s1), create_graph=True)
        second = torch.autograd.grad(g0.square().sum() + g1.abs().sum(), (a, *params))
        return out, g0, g1, second

    sep = cell.groups[0].ops["sep_conv_3x3"][2].weight  # after ReLU, Repeat; edge node 1 <- s0: 2nd slice
    got = derivatives(cell, [cell.preprocess0[1].weight, sep])
    want = derivatives(plain, [pre[0][1].weight, edges[1, 0][PRIMITIVES.index("sep_conv_3x3")][1].weight])
    got = (*got[:3], (*got[3][:2], got[3][2].chunk(3)[1]))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    for (i, s), ops in edges.items():
        for name, op in zip(PRIMITIVES, ops):
            for k, t in cell.edge_op(s, i, name).state_dict().items():
                if "num_batches" not in k:
                    torch.testing.assert_close(t, op.state_dict()[k], rtol=1e-12, atol=1e-12, msg=f"{i} {s} {name} {k}")


def test_shift_moves_one_pixel_and_pads_with_zeros():
    from search_spaces.operations import Shift

    x = torch.randn(2, 3, 5, 4)
    y = Shift()(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y[:, :, :-1, :-1], x[:, :, 1:, 1:])
    assert (y[:, :, -1] == 0).all() and (y[:, :, :, -1] == 0).all()


def test_batched_edges_keep_channels_last():
    """The repeat and the stride-2 skip's interleave of the batched edges give NHWC for NHWC
    inputs, with the same values as for NCHW ones."""
    from search_spaces.operations import FactorizedReduce, Repeat

    torch.manual_seed(0)
    fr, x = FactorizedReduce(4, 4, affine=False, edges=3), torch.randn(2, 4, 6, 6)
    for m in (fr, Repeat(3)):
        nhwc = m(x.contiguous(memory_format=torch.channels_last))
        assert nhwc.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(nhwc, m(x))


def test_sum_all_keeps_channels_last():
    from search_spaces.darts import sum_all

    ts = [torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last) for _ in range(3)]
    out = sum_all(ts)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ts[0] + ts[1] + ts[2])
    assert sum_all(ts[:1]) is ts[0]


@pytest.mark.parametrize(
    ("k", "stride", "padding", "dilation", "size"), [(3, 1, 1, 1, 7), (5, 2, 2, 1, 9), (3, 2, 1, 1, 8), (5, 2, 4, 2, 9)]
)
def test_depthwise_conv_backward_and_double_backward_equal_torchs(k, stride, padding, dilation, size):
    """The depthwise convolution's own backward (grouped convolutions when differentiated
    again) has the gradients and second derivatives of torch's conv2d: gradcheck,
    gradgradcheck and the double backward of a Jacobian-norm-like objective, also with
    param_grads=False (the input gradient depends on the output, as LeaSE's attack's does, so
    the weight's gradient also flows through the forward)."""
    import torch.nn.functional as F

    import search_spaces.double_backward as ops
    from search_spaces.operations import DepthwiseConv2d

    torch.manual_seed(0)
    conv = DepthwiseConv2d(4, 4, k, stride, padding, dilation=dilation, groups=4, bias=False).double()
    x = torch.rand(3, 4, size, size, dtype=torch.float64, requires_grad=True)

    def mine(x, w):
        with ops.differentiated_twice():
            return torch.func.functional_call(conv, {"weight": w}, (x,))

    torchs = lambda x, w: F.conv2d(x, w, None, stride, padding, dilation, 4)
    w = conv.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(mine, (x, w)) and torch.autograd.gradgradcheck(mine, (x, w))

    def second(f):
        (gx,) = torch.autograd.grad(f(x, w).sin().sum(), x, create_graph=True)
        return torch.autograd.grad(gx.abs().sum(), (x, w))

    torch.testing.assert_close(second(mine), second(torchs), rtol=1e-10, atol=1e-12)

    def input_only(x, w):
        with ops.differentiated_twice(param_grads=False):
            return torch.func.functional_call(conv, {"weight": w}, (x,))

    torch.testing.assert_close(second(input_only), second(torchs), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("affine", [False, True])
def test_frozen_batch_norm_double_backward_equals_torchs(affine):
    """Eval-mode BatchNorm2d (with and without an output scale) differentiates twice like
    torch's batch norm."""
    import torch.nn.functional as F

    from search_spaces.double_backward import differentiated_twice
    from search_spaces.operations import BatchNorm2d

    torch.manual_seed(0)
    bn = BatchNorm2d(4, affine=affine).double().eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    a = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)

    def mine(x, a, param_grads=True):
        with differentiated_twice(param_grads):
            return bn(x, a)

    assert torch.autograd.gradgradcheck(mine, (x, a))

    def second(f):
        (gx,) = torch.autograd.grad(f(x, a).sin().sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), (x, a, *bn.parameters()))

    w, b = (bn.weight, bn.bias) if affine else (None, None)
    ref = lambda x, a: a * F.batch_norm(x, bn.running_mean, bn.running_var, w, b, False, 0.0, bn.eps)
    torch.testing.assert_close(second(mine), second(ref), rtol=1e-10, atol=1e-12)
    # the first backward w.r.t. x only: the scale's and affine's gradients still flow through the forward
    input_only = lambda x, a: mine(x, a, param_grads=False)
    torch.testing.assert_close(second(input_only), second(ref), rtol=1e-10, atol=1e-12)


def test_supernet_second_derivatives_do_not_depend_on_the_custom_backward(monkeypatch):
    """The DSRNA Jacobian metric's alpha- and w-gradients (a double backward through the whole
    supernet, BN frozen) are the same through double_backward.py (no parameter gradients in
    the first backward) and through torch's ops."""
    import search_spaces.double_backward as db
    from distsearch.robust.jacobian import jacobian_metric

    torch.manual_seed(0)
    model = Supernet(1, 4, C=4, layers=3, nodes=2).double().eval()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    params = [model.alphas_normal, model.alphas_reduce, *model.weight_parameters()]
    calls = []
    for fn in (db.DepthwiseConv, db.FrozenBatchNorm):
        monkeypatch.setattr(fn, "apply", lambda *a, _apply=fn.apply: calls.append(1) or _apply(*a))
    ours = torch.autograd.grad(jacobian_metric(model, x, 0.1, "linf", 0), params, allow_unused=True)
    assert calls  # the metric's forward is marked differentiated_twice
    for name in ("depthwise_applies", "marked"):
        monkeypatch.setattr(db, name, lambda x: False)
    torchs = torch.autograd.grad(jacobian_metric(model, x, 0.1, "linf", 0), params, allow_unused=True)
    for a, b, p in zip(ours, torchs, params, strict=True):  # None: no dependence (torch may give zeros)
        a, b = (torch.zeros_like(p) if g is None else g for g in (a, b))
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert sum(float(g.abs().sum()) for g in ours[:2]) > 0  # alpha gets a gradient


def _library_entry_points():
    from distsearch.search import DartsSearcher
    from distsearch.storage import Store

    return [
        (Supernet, True),
        (Network, True),
        (Genotype.from_json, True),
        (DartsSearcher, True),
        (Store.save_checkpoint, True),
        (Store.load_checkpoint, True),
        (Store.latest, False),
        (Store.load_latest, True),
    ]


@pytest.mark.parametrize("index", range(8))
def test_library_entry_points_document_each_parameter_and_what_they_raise(index):
    """Their own docstrings (not inherited): every parameter named, and what is raised."""
    import inspect
    import re

    obj, raises = _library_entry_points()[index]
    if isinstance(obj, type):
        doc = (obj.__dict__.get("__doc__") or "") + (obj.__dict__["__init__"].__doc__ or "")
        params = list(inspect.signature(obj.__init__).parameters)[1:]
    else:
        doc, params = obj.__doc__ or "", list(inspect.signature(obj).parameters)
        params = [p for p in params if p not in ("self", "cls")]
    assert len(doc.split()) >= 12, f"{obj.__qualname__}: no docstring of its own"
    missing = [p for p in params if not re.search(rf"\b{p}\b", doc)]
    assert not missing, f"{obj.__qualname__}: parameters not in its docstring: {missing}"
    assert not raises or "raise" in doc.lower(), f"{obj.__qualname__}: its docstring does not say what is raised"
