"""Models with real parameter and buffer shapes, built locally (no downloads, no torchvision).

Only the tensors matter to an averaging benchmark, so the models have no ``forward``. Names
follow torchvision (ResNet-50) and timm (ViT-B/16).

>>> sum(p.numel() for p in small_tensors(n=3, numel=5).parameters())
15
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["Shapes", "small_tensors", "resnet50", "vit_b16", "MODELS", "QUICK"]


class Shapes(nn.Module):
    """A container of submodules and parameters with no ``forward``."""


def small_tensors(n: int = 2000, numel: int = 1000) -> nn.Module:
    """``n`` 1-D parameters of ``numel`` elements: the many-small-tensors case."""
    model = Shapes()
    model.params = nn.ParameterList(nn.Parameter(torch.randn(numel)) for _ in range(n))
    return model


def _conv(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False)


def _bottleneck(cin: int, width: int, stride: int) -> nn.Module:
    out = width * 4
    block = nn.ModuleDict(
        OrderedDict(
            conv1=_conv(cin, width, 1),
            bn1=nn.BatchNorm2d(width),
            conv2=_conv(width, width, 3, stride),  # torchvision's v1.5: the stride sits on the 3x3
            bn2=nn.BatchNorm2d(width),
            conv3=_conv(width, out, 1),
            bn3=nn.BatchNorm2d(out),
        )
    )
    if stride != 1 or cin != out:
        block["downsample"] = nn.Sequential(_conv(cin, out, 1, stride), nn.BatchNorm2d(out))
    return block


def resnet50(num_classes: int = 1000) -> nn.Module:
    """ResNet-50 (torchvision layout): 25,557,032 parameters in 161 tensors, 53 BatchNorms."""
    model = Shapes()
    model.conv1 = _conv(3, 64, 7, 2)
    model.bn1 = nn.BatchNorm2d(64)
    cin = 64
    for index, (width, blocks, stride) in enumerate([(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)], start=1):
        stage = []
        for b in range(blocks):
            stage.append(_bottleneck(cin, width, stride if b == 0 else 1))
            cin = width * 4
        model.add_module(f"layer{index}", nn.Sequential(*stage))
    model.fc = nn.Linear(cin, num_classes)
    return model


def _vit_block(dim: int, hidden: int) -> nn.Module:
    return nn.ModuleDict(
        OrderedDict(
            norm1=nn.LayerNorm(dim),
            attn=nn.ModuleDict(OrderedDict(qkv=nn.Linear(dim, 3 * dim), proj=nn.Linear(dim, dim))),
            norm2=nn.LayerNorm(dim),
            mlp=nn.ModuleDict(OrderedDict(fc1=nn.Linear(dim, hidden), fc2=nn.Linear(hidden, dim))),
        )
    )


def vit_b16(num_classes: int = 1000, image: int = 224) -> nn.Module:
    """ViT-B/16 (timm layout): 86,567,656 parameters in 152 tensors."""
    dim, depth, patch = 768, 12, 16
    tokens = (image // patch) ** 2 + 1  # patches plus the class token
    model = Shapes()
    model.patch_embed = nn.ModuleDict({"proj": nn.Conv2d(3, dim, patch, patch)})
    model.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
    model.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
    model.blocks = nn.ModuleList(_vit_block(dim, 4 * dim) for _ in range(depth))
    model.norm = nn.LayerNorm(dim)
    model.head = nn.Linear(dim, num_classes)
    return model


MODELS: dict[str, Callable[[], nn.Module]] = {
    "2000x1k": small_tensors,
    "resnet50": resnet50,
    "vit_b16": vit_b16,
}
QUICK: list[str] = ["2000x1k", "resnet50"]
