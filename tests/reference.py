"""An independent float64 re-derivation of the averaging rules, for tests only.

Written from DESIGN.md's table, not from the package: w_0 = 1; EMA 1 - decay; SWA 1 / (n + 1);
T-ADEMA 1 - alpha * tanh(n); the EMA warm-up of diffusers' EMAModel; EDM2's power EMA; integers
and non-averaged tensors are copied.
"""

from __future__ import annotations

import math

import torch

import wavg_fused as wf


def reference_weight(method: wf.Method, n: int) -> float:
    if n == 0:
        return 1.0
    if isinstance(method, wf.EMA):
        return 1.0 - method.decay
    if isinstance(method, wf.SWA):
        return 1.0 / (n + 1)
    if isinstance(method, wf.TADEMA):
        return 1.0 - method.alpha * math.tanh(n)
    if isinstance(method, wf.EMAWarmup):  # diffusers: decay = 1 - (1 + step / inv_gamma) ** -power
        decay = 1.0 - (1.0 + n / method.inv_gamma) ** -method.power
        return 1.0 - min(max(decay, method.min_decay), method.decay)
    if isinstance(method, wf.PowerEMA):  # EDM2: beta_t = (1 - 1 / t) ** (gamma + 1), t = n + 1
        return 1.0 - (1.0 - 1.0 / (n + 1)) ** (method.gamma + 1)
    raise TypeError(method)


class Reference:
    """Float64 average of a model's named tensors, plus a 'naive' one computed in the tensor's
    own dtype with plain tensor arithmetic: the error PyTorch itself makes in that dtype."""

    def __init__(self, method: wf.Method, use_buffers: bool, shadow_dtype: torch.dtype | None = None):
        self.method, self.use_buffers, self.shadow_dtype = method, use_buffers, shadow_dtype
        self.n = 0
        self.exact: dict[str, torch.Tensor] = {}
        self.naive: dict[str, torch.Tensor] = {}
        # the largest |value| each average or its inputs held: rounding in a + w (b - a) is
        # relative to the operands, so a result that cancels to near 0 keeps their error
        self.scale: dict[str, float] = {}

    def averaged(self, name: str, tensor: torch.Tensor, is_param: bool) -> bool:
        return tensor.is_floating_point() and (is_param or self.use_buffers)

    def update(self, model: torch.nn.Module) -> None:
        w = reference_weight(self.method, self.n)
        params = dict(model.named_parameters())
        for name, tensor in list(params.items()) + list(model.named_buffers()):
            tensor = tensor.detach().cpu().clone()  # never alias the live model
            if tensor.is_floating_point() and tensor.numel():
                seen = max(tensor.abs().max().item(), self.exact[name].abs().max().item() if name in self.exact else 0.0)
                self.scale[name] = max(self.scale.get(name, 0.0), seen)
            dtype = self.shadow_dtype if (self.shadow_dtype and tensor.is_floating_point()) else tensor.dtype
            if not self.averaged(name, tensor, name in params) or self.n == 0:
                self.exact[name] = tensor.to(torch.float64) if tensor.is_floating_point() else tensor.clone()
                self.naive[name] = tensor.to(dtype)
                continue
            self.exact[name] = self.exact[name] + w * (tensor.to(torch.float64) - self.exact[name])
            shadow = self.naive[name]
            self.naive[name] = shadow + (tensor.to(dtype) - shadow) * w
        self.n += 1


def assert_matches_reference(avg: wf.Averager, ref: Reference) -> None:
    """Every averaged tensor is within 2x the error of the naive same-dtype computation (plus a
    few ulps of the largest value it or its inputs held); copied tensors are exact. Says where
    values differ."""
    assert int(avg.n_averaged) == ref.n, f"n_averaged is {int(avg.n_averaged)}, expected {ref.n}"
    shadow = dict(avg.module.named_parameters()) | dict(avg.module.named_buffers())
    for name, exact in ref.exact.items():
        ours = shadow[name].detach().cpu()
        if not ours.is_floating_point():
            assert torch.equal(ours, exact), f"{name}: copied integer tensor differs: {ours} vs {exact}"
            continue
        ours64 = ours.to(torch.float64)
        err = (ours64 - exact).abs()
        naive_err = (ref.naive[name].to(torch.float64) - exact).abs().max().item() if exact.numel() else 0.0
        scale = max(exact.abs().max().item() if exact.numel() else 0.0, ref.scale.get(name, 0.0))
        bound = 2 * naive_err + 8 * torch.finfo(ours.dtype).eps * scale  # a few ulps of the operands: lerp vs a + w(b - a)
        if err.numel() and err.max().item() > bound:
            where = err.argmax().item()
            raise AssertionError(
                f"{name} ({ours.dtype}): max error {err.max().item():.3e} > bound {bound:.3e} "
                f"(naive {naive_err:.3e}) at flat index {where}: ours {ours64.flatten()[where].item()!r}, "
                f"float64 reference {exact.flatten()[where].item()!r}"
            )
