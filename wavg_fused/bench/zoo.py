"""Models with real parameter and buffer shapes, built locally (no downloads, no torchvision).

Only the tensors matter to an averaging benchmark, so the models have no ``forward``. Names
follow torchvision (ResNet-50), timm (ViT-B/16) and Hugging Face transformers (GPT-2, LLaMA).
``build`` makes one on a device, every floating-point tensor filled with random values (zeros
can run faster than real data and hide unwritten elements), in fp32 or bf16.

>>> sum(p.numel() for p in small_tensors(n=3, numel=5).parameters())
15
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["Shapes", "small_tensors", "resnet50", "vit_b16", "gpt2", "llama_1b3", "build", "MODELS", "QUICK", "LARGE"]


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


def _gpt2_block(dim: int) -> nn.Module:
    # transformers' Conv1D stores weights (in, out): only the shapes matter here
    def conv1d(cin: int, cout: int) -> nn.Module:
        layer = Shapes()
        layer.weight = nn.Parameter(torch.empty(cin, cout))
        layer.bias = nn.Parameter(torch.empty(cout))
        return layer

    return nn.ModuleDict(
        OrderedDict(
            ln_1=nn.LayerNorm(dim),
            attn=nn.ModuleDict(OrderedDict(c_attn=conv1d(dim, 3 * dim), c_proj=conv1d(dim, dim))),
            ln_2=nn.LayerNorm(dim),
            mlp=nn.ModuleDict(OrderedDict(c_fc=conv1d(dim, 4 * dim), c_proj=conv1d(4 * dim, dim))),
        )
    )


def gpt2(vocab: int = 50257, context: int = 1024, dim: int = 768, depth: int = 12) -> nn.Module:
    """GPT-2 small (transformers layout): 124,439,808 parameters in 148 tensors, ``lm_head`` tied
    to ``wte`` (one tensor, two names)."""
    model = Shapes()
    model.transformer = nn.ModuleDict(
        OrderedDict(
            wte=nn.Embedding(vocab, dim),
            wpe=nn.Embedding(context, dim),
            h=nn.ModuleList(_gpt2_block(dim) for _ in range(depth)),
            ln_f=nn.LayerNorm(dim),
        )
    )
    model.lm_head = nn.Linear(dim, vocab, bias=False)
    model.lm_head.weight = model.transformer["wte"].weight
    return model


class _RMSNorm(Shapes):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))


def _llama_layer(dim: int, hidden: int) -> nn.Module:
    linear = lambda cin, cout: nn.Linear(cin, cout, bias=False)  # noqa: E731
    return nn.ModuleDict(
        OrderedDict(
            self_attn=nn.ModuleDict(
                OrderedDict((name, linear(dim, dim)) for name in ("q_proj", "k_proj", "v_proj", "o_proj"))
            ),
            mlp=nn.ModuleDict(
                OrderedDict(gate_proj=linear(dim, hidden), up_proj=linear(dim, hidden), down_proj=linear(hidden, dim))
            ),
            input_layernorm=_RMSNorm(dim),
            post_attention_layernorm=_RMSNorm(dim),
        )
    )


def llama_1b3(vocab: int = 32000, dim: int = 2048, hidden: int = 5504, depth: int = 24) -> nn.Module:
    """A 1.3B LLaMA-style decoder (transformers layout, untied head): 1,345,423,360 parameters in
    219 tensors. 5.4 GB in fp32: GPU or large-memory runs only."""
    model = Shapes()
    model.model = nn.ModuleDict(
        OrderedDict(
            embed_tokens=nn.Embedding(vocab, dim),
            layers=nn.ModuleList(_llama_layer(dim, hidden) for _ in range(depth)),
            norm=_RMSNorm(dim),
        )
    )
    model.lm_head = nn.Linear(dim, vocab, bias=False)
    return model


MODELS: dict[str, Callable[[], nn.Module]] = {
    "2000x1k": small_tensors,
    "resnet50": resnet50,
    "vit_b16": vit_b16,
    "gpt2": gpt2,
    "llama_1b3": llama_1b3,
}
QUICK: list[str] = ["2000x1k", "resnet50"]
LARGE: list[str] = ["llama_1b3"]
"""Left out of a CPU run unless named: every peer holds its own copy (tens of GB)."""


@torch.no_grad()
def build(name: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """The zoo model ``name`` on ``device`` in ``dtype``, every floating-point tensor random.

    Built directly on ``device`` (a 1.3B model never passes through host memory on a GPU run).

    >>> model = build("2000x1k", dtype=torch.bfloat16)
    >>> p = next(model.parameters()); (p.dtype, bool((p != 0).all()))
    (torch.bfloat16, True)
    """
    with torch.device(device):
        model = MODELS[name]()
    generator = torch.Generator(device=device).manual_seed(seed)
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            # positive keeps BatchNorm's running_var valid; any non-zero value does for the rest
            tensor.uniform_(0.5, 1.5, generator=generator)
    return model.to(dtype) if dtype != torch.float32 else model
