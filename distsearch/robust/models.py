"""Named stand-alone classifiers for adversarial training, attacks and transfer studies.

Every model follows the convention of search_spaces.network.Network: `forward(x) =
forward_rest(first_layer(x))`, with `first_layer` an nn.Module taking the raw [0, 1] image,
so YOPO (Zhang et al. 2019, eq. 6: the adjoint p at the first layer's output) applies.
- `small_cnn`: two 3×3 convolutions with max-pooling and two linear layers (MNIST scale).
- `mlp`: a fully connected ReLU network, Szegedy et al. 2014's FC family (section 4.1).
- `resnet18`, `resnet34`, `resnet50`: torchvision ResNets (He et al. 2016) adapted to small
  inputs: 3×3 stride-1 stem on any number of input channels, no max-pool, untrained.
ReLUs and max pools are search_spaces.pattern's (torch's outside its contexts; the ResNets'
in-place ReLUs are swapped for them), so an audience's finite-difference Hessian-vector
products in LeaSE can replay them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from search_spaces.pattern import MaxPool2d, ReLU, make_replayable


class SmallCNN(nn.Module):
    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, width: int = 16, hidden: int = 128, dropout: float = 0.0
    ):
        super().__init__()
        self.first_layer = nn.Conv2d(in_channels, width, 3, padding=1)
        self.rest = nn.Sequential(
            ReLU(),
            MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            ReLU(),
            MaxPool2d(2),
            nn.AdaptiveAvgPool2d(7),
            nn.Flatten(),
            nn.Linear(2 * width * 49, hidden),
            ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward_rest(self, z: torch.Tensor) -> torch.Tensor:
        return self.rest(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_rest(self.first_layer(x))


class MLP(nn.Module):
    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, hidden: tuple[int, ...] = (100, 100)
    ):
        super().__init__()
        sizes = [in_channels * image_size * image_size, *hidden]
        self.first_layer = nn.Sequential(nn.Flatten(), nn.Linear(sizes[0], sizes[1]))
        layers: list[nn.Module] = []
        for a, b in zip(sizes[1:], sizes[2:]):
            layers += [ReLU(), nn.Linear(a, b)]
        self.rest = nn.Sequential(*layers, ReLU(), nn.Linear(sizes[-1], num_classes))

    def forward_rest(self, z: torch.Tensor) -> torch.Tensor:
        return self.rest(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_rest(self.first_layer(x))


class SmallInputResNet(nn.Module):
    """A torchvision ResNet with a 3×3 stride-1 stem (`first_layer`) and no max-pool."""

    def __init__(self, arch: str, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        import torchvision

        net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
        make_replayable(net)  # torchvision's in-place ReLUs -> the pattern's
        self.first_layer = nn.Conv2d(in_channels, net.conv1.out_channels, 3, stride=1, padding=1, bias=False)
        self.bn1, self.relu = net.bn1, net.relu
        self.layers = nn.Sequential(net.layer1, net.layer2, net.layer3, net.layer4)
        self.avgpool, self.fc = net.avgpool, net.fc

    def forward_rest(self, z: torch.Tensor) -> torch.Tensor:
        z = self.layers(self.relu(self.bn1(z)))
        return self.fc(torch.flatten(self.avgpool(z), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_rest(self.first_layer(x))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": SmallCNN,
    "mlp": MLP,
    "resnet18": lambda **kw: SmallInputResNet("resnet18", **kw),
    "resnet34": lambda **kw: SmallInputResNet("resnet34", **kw),
    "resnet50": lambda **kw: SmallInputResNet("resnet50", **kw),
}


def build_model(
    name: str, in_channels: int = 1, num_classes: int = 10, image_size: int | None = None, **kwargs: object
) -> nn.Module:
    """A named model; an unknown name or a bad size raises ValueError naming the field. `image_size`
    sizes the models that need it (the MLP's first layer takes C*H*W; its own default is 28), unless
    `kwargs` give one; the convolutional ones take any size."""
    if name == "mlp" and image_size is not None:
        kwargs.setdefault("image_size", image_size)
    if name not in MODELS:
        raise ValueError(f"model: unknown name {name!r}; choose one of {', '.join(MODELS)}")
    for field, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{field}: must be an integer >= 1, got {value!r}")
    try:
        return MODELS[name](in_channels=in_channels, num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise ValueError(f"model: bad option for {name!r}: {e}") from None
