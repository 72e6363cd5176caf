"""Accuracy of the second-order hypergradient's finite differences (DARTS eq. 8,
distsearch/search/hypergrad.py) against exact autograd through the unrolled step.

The reference builds w' = w - xi (grad_w L_train + wd w) with create_graph in float64 and
differentiates L_val(w') w.r.t. alpha. The finite-difference gradient is computed in the
asked precisions at each r, with the ReLU masks and max-pool choices of w replayed at
w +- R v (the default) and with plain differences. Prints JSON: the L2 error relative to the
whole alpha-gradient and relative to its second-order term (the part eq. 8 approximates);
in float32 also exact autograd's own error (the precision's floor).

    python benchmarks/hypergrad_accuracy.py                         # 5 cells, C=8, 3x16x16, B=8
    python benchmarks/hypergrad_accuracy.py --layers 8 --C 16 --size 32   # the paper's supernet
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
import torch.nn.functional as F
from torch.func import functional_call

from distsearch.search.hypergrad import unrolled_arch_grad
from search_spaces import Supernet


def flat(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().flatten().double() for t in ts])


def exact(model: Supernet, xt, yt, xv, yv, xi: float, wd: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact alpha-gradient, its first-order part grad_a L_val(w')), float64."""
    params = dict(model.named_parameters())
    names = [n for n in params if not n.startswith("alphas")]
    lt = F.cross_entropy(functional_call(model, params, (xt,)), yt)
    g = torch.autograd.grad(lt, [params[n] for n in names], create_graph=True)
    unrolled = {**params, **{n: params[n] - xi * (gi + wd * params[n]) for n, gi in zip(names, g)}}
    lv = F.cross_entropy(functional_call(model, unrolled, (xv,)), yv)
    arch = model.arch_parameters()
    whole = flat(list(torch.autograd.grad(lv, arch, retain_graph=True)))
    at_w1 = {**params, **{n: unrolled[n].detach() for n in names}}  # w' held fixed
    first = torch.autograd.grad(F.cross_entropy(functional_call(model, at_w1, (xv,)), yv), arch)
    return whole, flat(list(first))


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--C", type=int, default=8)
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--xi", type=float, default=0.025)
    p.add_argument("--r", type=float, nargs="+", default=[0.1, 0.01, 0.001])
    p.add_argument("--dtype", nargs="+", default=["float64", "float32"], choices=["float64", "float32"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.layers < 3:  # cells layers//3 and 2*layers//3 reduce: with fewer, alpha_normal is unused
        p.error("--layers: at least 3 (with fewer every cell is a reduction cell and alpha_normal gets no gradient)")
    torch.manual_seed(args.seed)
    model = Supernet(3, 10, C=args.C, layers=args.layers, nodes=args.nodes).double()
    shape = (args.batch, 3, args.size, args.size)
    xt, xv = torch.rand(shape, dtype=torch.float64), torch.rand(shape, dtype=torch.float64)
    yt, yv = torch.randint(10, (args.batch,)), torch.randint(10, (args.batch,))
    wd = 3e-4
    want, first = exact(model, xt, yt, xv, yv, args.xi, wd)
    second = (want - first).norm()
    rows = []
    for dtype in args.dtype:
        dt = getattr(torch, dtype)
        if dt != torch.float64:  # the precision's own floor: exact autograd in it
            m = copy.deepcopy(model).to(dt)
            own = exact(m, xt.to(dt), yt, xv.to(dt), yv, args.xi, wd)[0]
            rows.append(
                {
                    "dtype": dtype,
                    "differences": "none: exact autograd",
                    "alpha_grad_rel_err": float((own - want).norm() / want.norm()),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        for r in args.r:
            for replay in (True, False):
                m = copy.deepcopy(model).to(dt)  # the same weights, BN statistics and alphas
                bt, bv = xt.to(dt), xv.to(dt)
                got, _ = unrolled_arch_grad(
                    m.arch_parameters(),
                    m.weight_parameters(),
                    lambda m=m, bt=bt: F.cross_entropy(m(bt), yt),
                    lambda m=m, bv=bv: F.cross_entropy(m(bv), yv),
                    args.xi,
                    wd,
                    r=r,
                    replay=replay,
                )
                got = flat(got)
                rows.append(
                    {
                        "dtype": dtype,
                        "r": r,
                        "differences": "replayed" if replay else "plain",
                        "alpha_grad_rel_err": float((got - want).norm() / want.norm()),
                        "err_over_second_order_term": float((got - want).norm() / second),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    info = {"config": vars(args), "second_over_first_order_norm": float(second / first.norm()), "rows": rows}
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
