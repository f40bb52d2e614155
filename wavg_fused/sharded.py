"""Averaging a model whose tensors are DTensors (FSDP2 ``fully_shard``, tensor parallel).

A DTensor is a wrapper: the bytes this rank holds are its local tensor (``to_local()``), and the
wrapper says how the global tensor is laid over the mesh (``device_mesh``, ``placements``). The
averaged copy mirrors that exactly: its parameters are DTensors with the model's mesh and
placements whose local tensors are views into the averager's flat buffers, so a rank stores and
averages only its own shards (1/world of the model under FSDP2) and ``state_dict()`` hands DTensors
to ``torch.distributed.checkpoint``. Every update works on local tensors only: one fused launch per
rank, no collective, and the plan never sees a wrapper (``local_pairs``).

``torch.distributed`` is imported only where a DTensor or an FSDP2 module can already exist (the
module is in ``sys.modules``), so plain models pay nothing and builds without distributed work.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Sequence

import torch
from torch import nn

from .storage import ShadowStorage, copy_into_flats, named_tensors

__all__ = [
    "ShardedCopy",
    "is_dtensor",
    "local",
    "address",
    "local_pairs",
    "local_named_tensors",
    "has_dtensors",
    "is_fsdp",
    "reshard_fsdp",
    "check_supported",
    "copy_model",
    "pack_sharded_module",
]


def _dtensor_type() -> type | None:
    # DTensors exist only once torch.distributed.tensor is imported: no import here, no cost
    api = sys.modules.get("torch.distributed.tensor._api")
    return getattr(api, "DTensor", None)


def _fsdp_module_type() -> type | None:
    fully_shard = sys.modules.get("torch.distributed.fsdp._fully_shard._fully_shard")
    return getattr(fully_shard, "FSDPModule", None)


def is_dtensor(tensor: object) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor``.

    >>> is_dtensor(torch.zeros(2))
    False
    """
    cls = _dtensor_type()
    return cls is not None and isinstance(tensor, cls)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's local tensor of a DTensor (the same memory, no copy); other tensors as they are."""
    return tensor._local_tensor if is_dtensor(tensor) else tensor


def address(tensor: torch.Tensor) -> int:
    """Where the bytes are: a DTensor's ``data_ptr()`` is 0, its local tensor's is the real one."""
    return local(tensor).data_ptr()


def has_dtensors(module: nn.Module) -> bool:
    """Whether any parameter or buffer of ``module`` is a DTensor."""
    return _dtensor_type() is not None and any(is_dtensor(t) for _, t in named_tensors(module))


def local_named_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``named_tensors(module)`` with DTensors replaced by their local tensors."""
    return [(name, local(tensor)) for name, tensor in named_tensors(module)]


def _describe(tensor: torch.Tensor) -> str:
    if is_dtensor(tensor):
        return f"a DTensor {tuple(tensor.placements)} on {tensor.device_mesh}"
    return "a plain tensor"


def local_pairs(
    names: Sequence[str], shadows: Sequence[torch.Tensor], models: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The local tensors of (shadow, model) pairs whose global structure already matched.

    A DTensor shadow pairs only with a DTensor of the same mesh and placements (then their local
    shards are the same piece of the global tensor); anything else raises ``ValueError`` naming
    the tensor. An FSDP2 module caught unsharded (its root after an eval forward) is resharded by
    the averager before it gets here.
    """
    if _dtensor_type() is None:  # no DTensor can exist in this process
        return list(shadows), list(models)
    local_shadows, local_models = [], []
    for name, shadow, model in zip(names, shadows, models):
        shadow_sharded, model_sharded = is_dtensor(shadow), is_dtensor(model)
        if shadow_sharded or model_sharded:
            if not (shadow_sharded and model_sharded) or (
                shadow.device_mesh != model.device_mesh or tuple(shadow.placements) != tuple(model.placements)
            ):
                raise ValueError(
                    f"tensor {name!r}: the model holds {_describe(model)}, the averaged copy "
                    f"{_describe(shadow)}; average a model sharded as it was when the averager was "
                    "built (an FSDP2 model with its sharded parameters registered: model.reshard())"
                )
            shadow, model = shadow._local_tensor, model._local_tensor
            if shadow.shape != model.shape:
                raise ValueError(
                    f"tensor {name!r}: this rank's model shard has shape {tuple(model.shape)}, the "
                    f"averaged copy's {tuple(shadow.shape)}"
                )
        local_shadows.append(shadow)
        local_models.append(model)
    return local_shadows, local_models


# ---------------------------------------------------------------------- FSDP2 modules
def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    cls = _fsdp_module_type()
    return [] if cls is None else [m for m in model.modules() if isinstance(m, cls)]


def is_fsdp(model: nn.Module) -> bool:
    """Whether ``fully_shard`` (FSDP2) was applied to ``model`` or one of its submodules."""
    return bool(_fsdp_modules(model))


def reshard_fsdp(model: nn.Module) -> None:
    """Register the sharded parameters of every FSDP2 module in ``model`` again.

    FSDP2 swaps a module's parameters for unsharded (all-gathered) ones during forward and
    leaves the root's unsharded after a forward without backward (evaluation). The average
    pairs with the shards, so the averager reshards first; the unsharded copies hold nothing
    the shards do not (optimizers step the shards), and the next forward gathers them again.
    """
    for module in _fsdp_modules(model):
        module.reshard()


def check_supported(model: nn.Module) -> None:
    """Raise ``NotImplementedError`` for sharding schemes whose tensors are not the model's values.

    DeepSpeed ZeRO-3 replaces each parameter with an empty placeholder (its shard lives in
    ``param.ds_tensor``), and FSDP1 (``FullyShardedDataParallel``) flattens parameters into
    ``FlatParameter``s: averaging what the module shows would average placeholders or flat
    shards under names no unsharded model has.
    """
    for name, param in model.named_parameters():
        if hasattr(param, "ds_id") or hasattr(param, "ds_tensor"):
            raise NotImplementedError(
                f"model parameter {name!r} is partitioned by DeepSpeed ZeRO-3, which wavg_fused does not "
                "support yet: average a ZeRO-1/2 model, or a model sharded with torch's fully_shard (FSDP2)"
            )
    fsdp1 = getattr(sys.modules.get("torch.distributed.fsdp.fully_sharded_data_parallel"), "FullyShardedDataParallel", None)
    wrapped = [path for path, module in model.named_modules() if fsdp1 is not None and isinstance(module, fsdp1)]
    if wrapped:
        raise NotImplementedError(
            f"model{'.' + wrapped[0] if wrapped[0] else ''} is wrapped in FSDP1 (FullyShardedDataParallel), "
            "whose flattened parameters wavg_fused does not support: shard with "
            "torch.distributed.fsdp.fully_shard (FSDP2) instead"
        )
    if type(model).__name__ == "DeepSpeedEngine":
        raise NotImplementedError(
            "model is a DeepSpeedEngine: pass engine.module (ZeRO-1/2; ZeRO-3 is not supported yet)"
        )


class ShardedCopy(nn.Module):
    """The averaged copy of an FSDP2 model: the model's tensors (this rank's shards, as DTensors)
    under the model's names, without its code.

    ``fully_shard`` modules cannot be deep-copied, and a copy would carry FSDP's hooks and state.
    Evaluate the average through the FSDP model itself: ``with averager.swapped(model):
    model(x)``, or ``averager.copy_to(eval_model)`` for a second model sharded the same way.
    """

    def forward(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError(
            "the averaged copy of an FSDP2 (fully_shard) model holds only this rank's shards and none "
            "of the model's code: evaluate with `with averager.swapped(model): model(x)` (or "
            "averager.copy_to(eval_model)), or gather a full state dict with "
            "wavg_fused.distributed.full_state_dict(averager)"
        )


def _skeleton(model: nn.Module) -> ShardedCopy:
    # Same module paths, ties and persistence. New Parameter objects over the model's data
    # (packing rebinds a plain Parameter's .data: it must never be the model's own), and the
    # model's buffer tensors, which packing replaces in the copy's dicts only.
    root = ShardedCopy()
    root.train(model.training)
    parameters: dict[int, nn.Parameter] = {}
    for path, module in model.named_modules():
        target = root if not path else nn.Module()
        target.train(module.training)
        if path:
            parent_path, _, attribute = path.rpartition(".")
            root.get_submodule(parent_path).add_module(attribute, target)
        for name, param in module._parameters.items():
            if param is not None:
                if id(param) not in parameters:
                    parameters[id(param)] = nn.Parameter(param.detach(), requires_grad=param.requires_grad)
                target.register_parameter(name, parameters[id(param)])
        for name, buffer in module._buffers.items():
            if buffer is not None:
                target.register_buffer(name, buffer, persistent=name not in module._non_persistent_buffers_set)
    return root


def copy_model(model: nn.Module) -> nn.Module:
    """The averaged copy's starting point: ``copy.deepcopy(model)``, or, for a model that FSDP2
    (``fully_shard``) or composable ``replicate`` made impossible to deep-copy, a ``ShardedCopy``
    of its tensors. Either way the averager packs the result into its own storage. A model that
    deepcopy refuses otherwise (the deprecated ``torch.nn.utils.weight_norm``) raises an error of
    the same type that points to ``averaged_module=``, chained from deepcopy's."""
    if is_fsdp(model):
        reshard_fsdp(model)  # copy the shards, not an unsharded root left by an eval forward
        return _skeleton(model)
    try:
        return copy.deepcopy(model)
    except AssertionError as error:  # torch's composable APIs refuse deepcopy with an assertion
        if "does not support deepcopy" not in str(error):
            raise
        return _skeleton(model)
    except (RuntimeError, TypeError) as error:
        if isinstance(error, torch.OutOfMemoryError):  # not about copyability: no advice to give
            raise
        # torch's own message does not say what to do here; the same type, so callers' excepts still match
        from torch.nn.utils.weight_norm import WeightNorm

        old_weight_norm = [name or "<model>" for name, module in model.named_modules()
                           if any(isinstance(hook, WeightNorm) for hook in module._forward_pre_hooks.values())]
        cause = (f"modules {old_weight_norm} use the deprecated torch.nn.utils.weight_norm, whose weights "
                 "deepcopy refuses (torch.nn.utils.parametrizations.weight_norm copies fine)"
                 if old_weight_norm else f"{type(error).__name__}: {error}")
        kind = TypeError if isinstance(error, TypeError) else RuntimeError
        raise kind(
            f"the averaged copy is made with copy.deepcopy(model), which failed: {cause}. Build a second "
            "model of the same structure and pass it as averaged_module= (its tensors are taken over and "
            "set to the model's values)"
        ) from error


# ---------------------------------------------------------------------- storage for local shards
def _at_storage_start(view: torch.Tensor) -> torch.Tensor:
    """The same memory as a tensor whose storage starts at its first element.

    A DTensor copies its local tensor's storage offset, and torch.save cannot pickle a DTensor
    whose offset is not 0 (torch 2.14: "Attempted to access the data pointer on an invalid python
    storage"). A DLPack round trip aliases the bytes (no copy) with a storage of their own that
    keeps the flat buffer alive; ``torch.save`` then writes this shard's bytes only.
    """
    if view.storage_offset() == 0:
        return view
    from torch.utils import dlpack

    try:
        return dlpack.from_dlpack(dlpack.to_dlpack(view))
    except (RuntimeError, TypeError, BufferError):  # a dtype DLPack lacks: averaging still works, pickling not
        return view


def pack_sharded_module(
    module: nn.Module,
    device: torch.device | str | int | None = None,
    dtype: torch.dtype | None = None,
) -> ShadowStorage:
    """``storage.pack_module`` for a module holding DTensors: the flat buffers hold the *local*
    tensors; each DTensor is replaced by a new one with the same mesh, placements and global
    shape whose local tensor is a view into them. Plain tensors are packed as ``pack_module``
    packs them. Ties stay ties (one new Parameter for all names of a tied one)."""
    if is_fsdp(module):
        raise ValueError(
            "averaged_module: an FSDP2 (fully_shard) module cannot hold the average (FSDP keeps its own "
            "references to its shards); leave averaged_module out, and evaluate with averager.swapped(model) "
            "or averager.copy_to(a second fully_shard model)"
        )
    cls = _dtensor_type()
    unique: dict[int, torch.Tensor] = {}
    for _, tensor in named_tensors(module):
        unique.setdefault(id(tensor), tensor)
    if device is not None:
        wanted = torch.device(device)
        for tensor in unique.values():
            if isinstance(tensor, cls) and wanted.type != tensor.device_mesh.device_type:
                raise ValueError(
                    f"device={device!r}: the model is sharded over a {tensor.device_mesh.device_type!r} "
                    "mesh, and its averaged shards stay on that device type"
                )

    storage, replacement = copy_into_flats({key: local(tensor) for key, tensor in unique.items()}, device, dtype)
    for key_id, view in replacement.items():
        tensor = unique[key_id]
        if isinstance(tensor, cls):
            view = _at_storage_start(view)
            # run_check=False: no collective; shape and stride given, so nothing is inferred
            wrapped = cls.from_local(
                view, tensor.device_mesh, tensor.placements, run_check=False, shape=tensor.shape, stride=tensor.stride()
            )
            if view.numel() and wrapped._local_tensor.data_ptr() != view.data_ptr():
                raise RuntimeError("DTensor.from_local copied the local shard; the averager needs a view")
            replacement[key_id] = wrapped

    parameters: dict[int, nn.Parameter] = {}
    for submodule in module.modules():
        for name, param in submodule._parameters.items():
            if param is None or id(param) not in replacement:
                continue
            new = replacement[id(param)]
            if isinstance(new, cls):
                # `param.data = dtensor` corrupts a DTensor Parameter (torch 2.14): a new one instead
                if id(param) not in parameters:
                    parameters[id(param)] = nn.Parameter(new, requires_grad=param.requires_grad)
                submodule._parameters[name] = parameters[id(param)]
            else:
                param.data = new
        for name, buffer in submodule._buffers.items():
            if buffer is not None and id(buffer) in replacement:
                submodule._buffers[name] = replacement[id(buffer)]
    return storage
