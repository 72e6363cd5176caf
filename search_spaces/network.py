"""The discrete network built from a Genotype, for retraining (Liu et al. 2019, section 3.2).

Cells stacked as in the search, with affine BN, drop-path on non-identity edges and an
optional auxiliary head after the second reduction. The first layer is exposed as
`first_layer` and the rest as `forward_rest(z)` so YOPO can take adjoints at the first
layer (Zhang et al. 2019).
"""

from __future__ import annotations

import torch
from torch import nn

from .darts import reduction_layers
from .genotype import Genotype
from .operations import FactorizedReduce, Identity, make_op, relu_conv_bn
from .pattern import ReLU


def drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    if drop_prob <= 0.0:
        return x
    keep = 1.0 - drop_prob
    mask = torch.empty(x.size(0), 1, 1, 1, device=x.device, dtype=x.dtype).bernoulli_(keep)
    return x / keep * mask


class Cell(nn.Module):
    def __init__(self, genotype: Genotype, C_pp: int, C_p: int, C: int, reduction: bool, reduction_prev: bool):
        super().__init__()
        self.reduction = reduction
        self.preprocess0 = FactorizedReduce(C_pp, C) if reduction_prev else relu_conv_bn(C_pp, C, 1, 1, 0)
        self.preprocess1 = relu_conv_bn(C_p, C, 1, 1, 0)
        edges = genotype.reduce if reduction else genotype.normal
        self.concat = genotype.reduce_concat if reduction else genotype.normal_concat
        self.inputs = [i for _, i in edges]
        self.ops = nn.ModuleList(make_op(name, C, 2 if reduction and i < 2 else 1, affine=True) for name, i in edges)
        self.multiplier = len(self.concat)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: float) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for n in range(len(self.ops) // 2):
            h = []
            for k in (2 * n, 2 * n + 1):
                out = self.ops[k](states[self.inputs[k]])
                if self.training and not isinstance(self.ops[k], Identity):
                    out = drop_path(out, drop_prob)
                h.append(out)
            states.append(h[0] + h[1])
        return torch.cat([states[i] for i in self.concat], dim=1)


class AuxiliaryHead(nn.Module):
    """Auxiliary classifier (DARTS, after 2/3 of the depth); pooled adaptively so any size works."""

    def __init__(self, C: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            ReLU(inplace=False),
            nn.AdaptiveAvgPool2d(2),
            nn.Conv2d(C, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            ReLU(inplace=False),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.BatchNorm2d(768),
            ReLU(inplace=False),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class Network(nn.Module):
    """The discrete network of a Genotype, for retraining: stem, `layers` cells (reduction cells
    at 1/3 and 2/3 of the depth), global pooling, linear classifier.

    forward(x) returns logits; with an auxiliary head in training mode, `self.aux_logits`
    holds the auxiliary logits of the last forward.

    genotype: the cells (validated against PRIMITIVES).
    in_channels, num_classes: of the images and of the logits.
    C: channels of the first cells (doubled at each reduction); layers: the number of cells.
    auxiliary: add the auxiliary head after the last reduction (its logits in `aux_logits`; a
        loss using them is the caller's: distsearch's training does not).
    stem_multiplier: the first layer outputs stem_multiplier * C channels.
    drop_path_prob: drop-path probability of non-identity edges in training (settable later).
    Raises GenotypeError when the genotype names an unknown op or an impossible input.
    """

    def __init__(
        self,
        genotype: Genotype,
        in_channels: int = 3,
        num_classes: int = 10,
        C: int = 36,
        layers: int = 20,
        auxiliary: bool = False,
        stem_multiplier: int = 3,
        drop_path_prob: float = 0.0,
    ):
        super().__init__()
        genotype.validate()
        self.genotype, self.drop_path_prob = genotype, drop_path_prob
        self.config = dict(
            in_channels=in_channels,
            num_classes=num_classes,
            C=C,
            layers=layers,
            auxiliary=auxiliary,
            stem_multiplier=stem_multiplier,
        )
        C_curr = stem_multiplier * C
        self.first_layer = nn.Conv2d(in_channels, C_curr, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(C_curr)
        C_pp, C_p, C_curr = C_curr, C_curr, C
        reductions = reduction_layers(layers)
        self.cells = nn.ModuleList()
        self.aux_index = max(reductions)
        reduction_prev, C_aux = False, C_p
        for i in range(layers):
            reduction = i in reductions
            if reduction:
                C_curr *= 2
            cell = Cell(genotype, C_pp, C_p, C_curr, reduction, reduction_prev)
            self.cells.append(cell)
            reduction_prev = reduction
            C_pp, C_p = C_p, cell.multiplier * C_curr
            if i == self.aux_index:
                C_aux = C_p
        self.auxiliary_head = AuxiliaryHead(C_aux, num_classes) if auxiliary else None
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_p, num_classes)
        self.aux_logits: torch.Tensor | None = None

    def forward_rest(self, z: torch.Tensor) -> torch.Tensor:
        s0 = s1 = self.stem_bn(z)
        self.aux_logits = None
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == self.aux_index and self.auxiliary_head is not None and self.training:
                self.aux_logits = self.auxiliary_head(s1)
        return self.classifier(self.global_pooling(s1).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_rest(self.first_layer(x))
