"""Cheap second derivatives for DSRNA's Jacobian norms (Hosseini, Yang, Xie, CVPR 2021,
section 3.1) and LeaSE's differentiated attack step: autograd Functions whose backward is
written in differentiable ops, used inside `differentiated_twice()`.

torch's double backward of a grouped convolution loops over the groups (one convolution per
channel, 17 kernels for a 16-channel depthwise conv) and that of batch norm is a generic
formula of ~20 kernels per call. Here a depthwise conv's backward is a transposed grouped
conv (input) and one grouped conv of x with the output gradient as filters (weight), and an
eval-mode batch norm's is its affine map's; a plain backward calls torch's own kernels.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

_MARKS: list[bool] = []  # one per open differentiated_twice(): whether it wants parameter gradients


@contextmanager
def differentiated_twice(param_grads: bool = True) -> Iterator[None]:
    """Marks forwards whose backward will itself be differentiated (create_graph=True: DSRNA's
    Jacobian norms, LeaSE's differentiated attack steps): their eval-mode batch norms and
    depthwise convolutions record the backward of this module. Elsewhere both are torch's
    plain ops, whose backward computes only the gradients asked for; a custom backward cannot
    tell, so with `param_grads=False` their differentiable backward (create_graph=True) gives
    no parameter gradients: for the first backward, taken w.r.t. the inputs only, as both users
    do. A later plain backward through the same forward (LeaSE's: the attack's CE gradient
    depends on the logits, so the parameter gradients flow through the forward nodes as well
    as through the recorded backward) computes every parameter gradient it reaches."""
    _MARKS.append(param_grads)
    try:
        yield
    finally:
        _MARKS.pop()


# False: depthwise convs keep torch's double backward even when marked (for comparisons; it
# was slower on the CPU too: LeaSE steps 5.3-5.5 s vs 4.7-5.0 s, DSRNA-Jacobian 2.3 s vs 1.8-2.1 s).
OWN_DEPTHWISE_BACKWARD = True


def marked(x: torch.Tensor) -> bool:
    """Whether a module seeing `x` runs inside differentiated_twice() (and not under autocast)."""
    return bool(_MARKS) and not torch.is_autocast_enabled(x.device.type)


def depthwise_applies(x: torch.Tensor) -> bool:
    return OWN_DEPTHWISE_BACKWARD and marked(x)


class FrozenBatchNorm(torch.autograd.Function):
    """Eval-mode batch norm (a per-channel affine map): differentiated twice as that map."""

    @staticmethod
    def forward(ctx, x, mean, var, weight, bias, eps):  # noqa: ANN001, ANN205
        ctx.save_for_backward(x, mean, var, weight)
        ctx.eps, ctx.param_grads = eps, _MARKS[-1] if _MARKS else True
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        x, mean, var, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        if not torch.is_grad_enabled():  # a plain backward: every gradient asked for
            none = x.new_empty(0)  # eval mode: no saved batch statistics, as native_batch_norm leaves them
            gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
                g, x, weight, mean, var, none, none, False, ctx.eps, [need_x, need_w, need_b]
            )
            return gx, None, None, gw, gb, None
        need_w, need_b = need_w and ctx.param_grads, need_b and ctx.param_grads
        shape = (1, -1) + (1,) * (x.dim() - 2)
        inv = torch.rsqrt(var + ctx.eps)
        gx = (g * (inv if weight is None else inv * weight).view(shape)) if need_x else None
        gw = (g * (x - mean.view(shape)) * inv.view(shape)).sum((0, *range(2, x.dim()))) if need_w else None
        gb = g.sum((0, *range(2, x.dim()))) if need_b else None
        return gx, None, None, gw, gb, None


class DepthwiseConv(torch.autograd.Function):
    """conv2d with groups = in_channels: differentiated twice through grouped convolutions."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding, dilation):  # noqa: ANN001, ANN205
        ctx.save_for_backward(x, weight)
        ctx.conf, ctx.param_grads = (stride, padding, dilation), _MARKS[-1] if _MARKS else True
        return F.conv2d(x, weight, None, stride, padding, dilation, x.shape[1])

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        x, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.conf
        C, need_x, need_w = x.shape[1], ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not torch.is_grad_enabled():  # a plain backward: every gradient asked for
            gx, gw, _ = torch.ops.aten.convolution_backward(
                g, x, weight, None, stride, padding, dilation, False, [0, 0], C, [need_x, need_w, False]
            )
            return gx, gw, None, None, None
        gx = gw = None
        need_w = need_w and ctx.param_grads
        k = weight.shape[-2:]
        if need_x:  # the adjoint: a transposed grouped convolution, sized back to x
            extra = [
                x.shape[2 + i] - ((g.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (k[i] - 1) + 1)
                for i in (0, 1)
            ]
            gx = F.conv_transpose2d(g, weight, None, stride, padding, extra, C, dilation)
        if need_w:  # one grouped convolution of x (images as channels) with g as the filters
            xs = x.transpose(0, 1).reshape(1, C * x.shape[0], *x.shape[2:])
            gw = F.conv2d(xs, g.transpose(0, 1), None, dilation, padding, stride, C)  # stride and dilation swap
            gw = gw[..., : k[0], : k[1]].transpose(0, 1)
        return gx, gw, None, None, None
