"""What the bound rules of bounds_ibp.py / bounds_linear.py may be trusted with (DSRNA, Hosseini,
Yang, Xie, CVPR 2021, section 3.2; verification-based evaluation): a model whose modules compute
what the rules assume. The rules dispatch on isinstance, so a subclass that adds code, a patched
method or a forward hook would be bounded as something it is not, and the certificate would be
wrong, not just loose: check_model refuses them by name. No host sync.
"""

from __future__ import annotations

from torch import nn

from search_spaces import pattern
from search_spaces.darts import EdgeGroup, SearchCell, Supernet
from search_spaces.network import Cell, Network
from search_spaces.operations import BatchNorm2d, DepthwiseConv2d, FactorizedReduce, Identity, Repeat, Shift, Zero

from .bounds_ibp import SUPPORTED
from .models import MLP, SmallCNN

# The classes the rules above bound, by what their own code computes. A subclass of one of them
# (a user's nn.Sequential with its own __init__, a parametrised Conv2d's class) is bounded as that
# class, so it may add only dunder methods (not __call__ or attribute lookup) and properties
# (parametrised weights are read through them): any other method it defines (forward,
# _conv_forward, forward_rest, ...) or an instance attribute shadowing a method may compute
# something else, and is refused. The search space's own subclasses compute their parents'
# function (a BN scale, a depthwise kernel, a recorded ReLU / max-pool pattern that bounds never
# replay) and are bounded classes themselves.
BOUNDED = (
    nn.Sequential, nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d,
    nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Identity, nn.Dropout, nn.Flatten,
    BatchNorm2d, DepthwiseConv2d, pattern.ReLU, pattern.MaxPool2d,
    Supernet, SearchCell, EdgeGroup, Network, Cell, SmallCNN, MLP,
    FactorizedReduce, Identity, Zero, Shift, Repeat,
)  # fmt: skip
HOOKS_INTO_CALLS = {"__call__", "__getattr__", "__getattribute__"}  # the dunders that may change a result


def _added_code(m: nn.Module) -> str | None:
    """What `m` adds to the bounded class it is bounded as, if anything: a method its class
    chain defines above that class, or a method patched on the instance."""
    for name, value in vars(m).items():
        if callable(value) and callable(getattr(type(m), name, None)):
            return f"{name} patched on the instance"
    for cls in type(m).__mro__:
        if cls in BOUNDED:
            return None
        for name, value in vars(cls).items():
            dunder = name.startswith("__") and name.endswith("__") and name not in HOOKS_INTO_CALLS
            if callable(value) and not dunder and name != "extra_repr" and not isinstance(value, type):
                return f"{cls.__name__}.{name}"
    return None


def check_model(model: nn.Module, hooks: bool = True) -> None:
    """Refuse what the rules would bound as something else: a subclass of a BOUNDED class that
    adds code (an nn.Sequential whose forward normalises its input, a Conv2d that standardises
    its weight in _conv_forward, a Network whose forward negates the logits), whose bounds would
    be those of the parent class, and with `hooks` a module with forward hooks (they may change
    inputs or outputs; a search step's own model passes hooks=False: observers may watch it).
    No host sync."""
    from torch.nn.modules import module as torch_module

    if hooks and (torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks):
        raise ValueError(
            "bounds: global forward hooks are registered (they may change what modules compute); remove them"
        )
    for name, m in model.named_modules():
        where = f"{name or 'the model'} ({type(m).__name__})"
        if hooks and (m._forward_hooks or m._forward_pre_hooks):
            raise ValueError(
                f"bounds: {where} has forward hooks, which the bounds would ignore; remove them first "
                "(weight reparametrisations: torch.nn.utils.parametrize works)"
            )
        if isinstance(m, nn.AvgPool2d) and m.divisor_override is not None and m.divisor_override <= 0:
            raise ValueError(  # the rules take a pool's weights as nonnegative
                f"bounds: {where} has divisor_override {m.divisor_override}; bounds need a positive divisor"
            )
        base = next((c for c in type(m).__mro__ if c in BOUNDED), None)
        added = _added_code(m) if base is not None else None
        if added:
            raise ValueError(
                f"bounds: {where} is bounded as {base.__name__}, but {added} may compute something else; "
                f"write what it adds as modules of an nn.Sequential. {SUPPORTED}"
            )
