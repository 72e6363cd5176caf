"""The hypergradients against exact autograd through the unrolled step (float64).

The finite-difference radius is 1e-6 here: with the paper's r = 0.01 a weight step of norm
0.01 crosses ReLU / max-pool kinks of a 2-channel net, so the test would measure the
approximation's curvature error, not whether the formula is implemented right. Stated
tolerance: rtol 1e-4, atol 1e-7.
"""

import torch
import torch.nn.functional as F
from torch.func import functional_call

from distsearch.search.hypergrad import first_order_arch_grad, unrolled_arch_grad
from search_spaces import Supernet


def _setup():
    torch.manual_seed(0)
    m = Supernet(1, 3, C=2, layers=3, nodes=2, ops=("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3"))
    m = m.double()
    with torch.no_grad():
        for a in m.arch_parameters():
            a.normal_(0, 0.5)
    xt, yt = torch.rand(6, 1, 8, 8, dtype=torch.float64), torch.randint(3, (6,))
    xv, yv = torch.rand(6, 1, 8, 8, dtype=torch.float64), torch.randint(3, (6,))
    return m, (xt, yt), (xv, yv)


def test_second_order_matches_exact_autograd_through_the_unrolled_step():
    m, (xt, yt), (xv, yv) = _setup()
    xi, wd = 0.05, 3e-4
    names = [n for n, p in m.named_parameters() if not n.startswith("alphas")]
    weights = [dict(m.named_parameters())[n] for n in names]
    arch = m.arch_parameters()

    # exact: w' = w - xi (grad L_tr + wd w) built with create_graph, differentiated w.r.t. alpha
    params = dict(m.named_parameters())
    lt = F.cross_entropy(functional_call(m, params, (xt,)), yt)
    g = torch.autograd.grad(lt, weights, create_graph=True)
    unrolled = {**params, **{n: w - xi * (gi + wd * w) for n, w, gi in zip(names, weights, g)}}
    lv = F.cross_entropy(functional_call(m, unrolled, (xv,)), yv)
    exact = torch.autograd.grad(lv, arch)

    before = [w.detach().clone() for w in weights]
    approx, _ = unrolled_arch_grad(
        arch, weights, lambda: F.cross_entropy(m(xt), yt), lambda: F.cross_entropy(m(xv), yv), xi, wd, r=1e-6
    )
    for e, a in zip(exact, approx):
        assert torch.allclose(e, a, rtol=1e-4, atol=1e-7), (e - a).abs().max()
    # the second-order term matters here (not just the first-order part)
    first, _ = first_order_arch_grad(arch, lambda: F.cross_entropy(m(xv), yv))
    assert max((e - f).abs().max() for e, f in zip(exact, first)) > 1e-5
    assert all(torch.equal(b, w) for b, w in zip(before, weights)), "weights must be restored bitwise"


def test_first_order_is_grad_of_val_loss():
    m, _, (xv, yv) = _setup()
    arch = m.arch_parameters()
    got, lv = first_order_arch_grad(arch, lambda: F.cross_entropy(m(xv), yv))
    want = torch.autograd.grad(F.cross_entropy(m(xv), yv), arch)
    assert all(torch.allclose(a, b) for a, b in zip(got, want))
    assert torch.isclose(lv, F.cross_entropy(m(xv), yv).detach())
