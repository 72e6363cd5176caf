"""Frozen activation patterns (search_spaces/pattern.py): inside frozen_pattern a frozen-BN
supernet is linear along x + h u (the difference is exactly h times the one at h = 1, far
past every ReLU and max-pool kink), the rows before the base rows and the base rows
themselves are the plain forward's, and outside it the modules are torch's. Recording a
Pattern leaves the forward as it was, its replay at the same weights gives the same function,
and a replay that does not follow the recorded forward is refused."""

from __future__ import annotations

import pytest
import torch

from search_spaces import Supernet
from search_spaces.pattern import MaxPool2d, Pattern, ReLU, frozen_pattern, make_replayable, recording, replaying


def frozen_supernet() -> Supernet:
    torch.manual_seed(0)
    net = Supernet(in_channels=1, num_classes=4, C=4, layers=3, nodes=2).double()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def test_moved_rows_are_linear_in_the_step_and_other_rows_unchanged() -> None:
    net = frozen_supernet()
    g = torch.Generator().manual_seed(1)
    free, x = (
        torch.rand(3, 1, 8, 8, generator=g, dtype=torch.double),
        torch.rand(4, 1, 8, 8, generator=g, dtype=torch.double),
    )
    u = torch.randn(2, 4, 1, 8, 8, generator=g, dtype=torch.double)  # two directions per example
    with torch.no_grad():
        plain = net(torch.cat([free, x]))

        def difference(h: float, frozen: bool) -> torch.Tensor:
            batch = torch.cat([free, x, (x + h * u).flatten(0, 1)])
            if not frozen:
                return net(batch)[7:].view(2, 4, -1) - plain[3:]
            with frozen_pattern(base=4, copies=2):
                out = net(batch)
            torch.testing.assert_close(out[:7], plain, rtol=0, atol=1e-14)  # free and base rows
            return out[7:].view(2, 4, -1) - out[3:7]

        for h in (1e-3, 0.1, 3.0):
            torch.testing.assert_close(difference(h, True), h * difference(1.0, True), rtol=1e-9, atol=1e-12)
        plain_diff = difference(1.0, False)  # the control: kinks crossed, not linear
        assert (plain_diff - 1e3 * difference(1e-3, False)).abs().max() > 1e-3 * plain_diff.abs().max()


def test_modules_are_torch_s_outside_the_context() -> None:
    x = torch.randn(5, 3, 7, 7, requires_grad=True)
    ours, torchs = [ReLU(), MaxPool2d(3, 2, 1)], [torch.nn.ReLU(), torch.nn.MaxPool2d(3, 2, 1)]
    for a, b in zip(ours, torchs):
        assert torch.equal(a(x), b(x))
    with frozen_pattern(base=5, copies=0):  # every row its own leader: the same values
        for a, b in zip(ours, torchs):
            assert torch.equal(a(x), b(x))


def test_recording_changes_nothing_and_replaying_at_the_same_weights_is_the_same_forward() -> None:
    torch.manual_seed(3)
    net = Supernet(in_channels=1, num_classes=4, C=4, layers=3, nodes=2).double()  # train mode
    x = torch.rand(5, 1, 8, 8, dtype=torch.double)
    plain = net(x)
    p = Pattern()
    with recording(p):
        recorded = net(x)
    assert torch.equal(recorded, plain) and len(p.choices) > 0
    assert {t.dtype for t in p.choices} == {torch.bool, torch.int64}  # ReLU masks and max-pool argmaxes
    for _ in range(2):  # replayable more than once (w + R v, then w - R v)
        with replaying(p):
            replayed = net(x)
        assert torch.equal(replayed, plain)
    grads = [torch.autograd.grad(out.square().sum(), net.arch_parameters()) for out in (plain, replayed)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_a_replay_that_does_not_follow_the_recording_is_refused() -> None:
    net = Supernet(in_channels=1, num_classes=4, C=4, layers=3, nodes=2)
    x = torch.rand(4, 1, 8, 8)
    p = Pattern()
    with recording(p):
        net(x)
    with pytest.raises(RuntimeError, match="does not follow the recorded forward"), replaying(p):
        net(x[:2])  # another batch
    with pytest.raises(RuntimeError, match="recorded choices used"), replaying(p):
        assert p.choices[0].dtype == torch.bool
        ReLU()(torch.zeros(p.choices[0].shape))  # a forward that stops after its first ReLU


def test_the_built_in_audiences_record_and_replay() -> None:
    """small_cnn, mlp and the ResNets (torchvision's in-place ReLUs swapped) run every ReLU and
    max pool through the pattern, so LeaSE's audience differences can replay them."""
    from distsearch.robust.models import build_model

    torch.manual_seed(0)
    for name, kw in (("small_cnn", {}), ("mlp", {"image_size": 16}), ("resnet18", {})):
        model = build_model(name, 3, 10, **kw)
        assert not any(type(m) in (torch.nn.ReLU, torch.nn.MaxPool2d) for m in model.modules()), name
        x = torch.rand(2, 3, 16, 16)
        p = Pattern()
        with recording(p):
            out = model(x)
        with replaying(p):
            assert torch.equal(model(x), out) and out.shape == (2, 10)
        assert len(p.choices) > 0


def test_make_replayable_swaps_torch_modules_for_the_same_function() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(inplace=True), torch.nn.MaxPool2d(2, ceil_mode=True), torch.nn.ReLU()
    )
    x = torch.randn(3, 1, 9, 9)
    want = net(x)
    assert make_replayable(net) == 3
    assert isinstance(net[1], ReLU) and isinstance(net[2], MaxPool2d) and net[2].ceil_mode
    assert torch.equal(net(x), want)
