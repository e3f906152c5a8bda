"""Put a Tied-LoRA adapter on a model, count it, merge it, take it off.

Works on any torch model whose decoder layers sit in an nn.ModuleList (every Hugging Face
causal LM) and whose projections are nn.Linear or GPT-2's Conv1D; transformers is not needed.
"""

from __future__ import annotations

import contextlib
from typing import cast

import torch
from torch import nn

from .config import PARTS, TiedLoraConfig, TiedLoraError
from .layer import AdaptedLinear, GroupAdapter, Site, TiedParameters, new_parameter, tensor_key
from .layout import find_groups, find_layers, path_of, replace_submodule

ATTRIBUTE = "tiedlora"  # the root module's name on the model, and its state-dict prefix


def apply(model: nn.Module, config: TiedLoraConfig, *, device=None, dtype=torch.float32) -> nn.Module:
    """Adapt `model` in place and return it; every base weight is frozen. Adapter tensors are
    created in `dtype` (fp32 by default, also beside a bf16 base) on the base weights' device,
    or on `device` (e.g. "cpu" for a shape-only base built on the meta device)."""
    if not isinstance(config, TiedLoraConfig):
        raise TiedLoraError(
            f"config must be a tiedlora.TiedLoraConfig, got {type(config).__name__}; e.g. "
            "TiedLoraConfig.preset('tl6', rank=8)."
        )
    if has_adapter(model):
        raise TiedLoraError("This model already carries a Tied-LoRA adapter: call tiedlora.remove(model) first.")
    layers = find_layers(model)
    indices = config.layer_indices(len(layers))
    groups = find_groups(layers, indices, config.targets)
    for g in groups:
        if config.rank > min(g.d_in, sum(g.d_outs)):
            limit = min(g.d_in, sum(g.d_outs))
            raise TiedLoraError(
                f"rank={config.rank} is larger than the {g.name!r} projection ({g.d_in} -> {sum(g.d_outs)}): "
                f"use rank <= {limit}."
            )
    model.requires_grad_(False)

    root = TiedParameters(config)
    prefix = path_of(model, layers)
    for g in groups:
        shapes = config.part_shapes(g.d_in, sum(g.d_outs))
        weight = layers[indices[0]].get_submodule(g.members[0]).weight
        place = dict(device=device if device is not None else weight.device, dtype=dtype)

        def part(p: str, layer: int | None, g=g, shapes=shapes, place=place) -> nn.Parameter:
            return new_parameter(config.parts[p], shapes[p], config.seed, tensor_key(g.name, p, layer), **place)

        tied = nn.ParameterDict({p: part(p, None) for p in PARTS if config.parts[p].tied})
        root[g.name] = tied
        for i in indices:
            own = {p: part(p, i) for p in PARTS if not config.parts[p].tied}
            adapter = GroupAdapter(tied, own, config.scale, config.dropout, tensor_key(g.name, "dropout", i))
            owner = layers[i].get_submodule(g.owner)
            owner.add_module(f"{ATTRIBUTE}_{g.name}", adapter)
            adapted = []
            for name, rows in zip(g.members, g.rows()):
                member = AdaptedLinear(layers[i].get_submodule(name), adapter, rows)
                replace_submodule(layers[i], name, member)
                adapted.append((f"{prefix}.{i}.{name}", member))
            root.sites.append(Site(i, g, adapter, owner, adapted, adapter.shared.attach(owner)))
    setattr(model, ATTRIBUTE, root)
    return model


def has_adapter(model: nn.Module) -> bool:
    return hasattr(model, ATTRIBUTE)


def root(model: nn.Module) -> TiedParameters:
    found = getattr(model, ATTRIBUTE, None)
    if not isinstance(found, TiedParameters):
        raise TiedLoraError(
            "This model carries no Tied-LoRA adapter: call tiedlora.apply(model, config) or "
            "tiedlora.load(model, folder) first."
        )
    return found


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every adapter tensor once, under a key that does not depend on where the model is
    wrapped: `<group>.<part>` when tied, `<group>.layers.<i>.<part>` when per layer."""
    r = root(model)
    params = {tensor_key(group, name): p for group, tied in r.tensors().items() for name, p in tied.items()}
    for site in r.sites:
        params.update({tensor_key(site.group.name, name, site.layer): p for name, p in site.adapter.named_parameters()})
    return params


def trainable_parameters(model: nn.Module) -> int:
    """Unique trainable adapter parameters; a tied tensor counts once."""
    return sum(p.numel() for p in adapter_parameters(model).values() if p.requires_grad)


def merge(model: nn.Module) -> nn.Module:
    """Fold the update into every adapted W (exact up to the weights' rounding); a no-op on a
    module already merged. Quantized base weights are refused before any is changed."""
    members = _members(model)
    weights = {path: cast(torch.Tensor, m.base.weight) for site in root(model).sites for path, m in site.members}
    quantized = [(path, w.dtype) for path, w in weights.items() if not w.is_floating_point()]
    if quantized:
        raise TiedLoraError(
            f"The base weights are quantized ({quantized[0][0]} holds {quantized[0][1]}), so the update "
            "cannot be folded "
            "into them exactly: merge into the unquantized base model instead (tiedlora merge loads it so)."
        )
    for member in members:
        if not member.merged:
            member.fold(+1)
            member.merged = True
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Subtract the update again; a no-op on a module not merged."""
    for member in _members(model):
        if member.merged:
            member.fold(-1)
            member.merged = False
    return model


def is_merged(model: nn.Module) -> bool:
    return any(m.merged for m in _members(model))


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Run the base model alone: inside, outputs equal the unadapted model's exactly."""
    if is_merged(model):
        raise TiedLoraError(
            "The adapter is merged into the weights, so it cannot be switched off exactly: call "
            "tiedlora.unmerge(model) first."
        )
    sites = root(model).sites
    for site in sites:
        site.adapter.enabled = False
    try:
        yield model
    finally:
        for site in sites:
            site.adapter.enabled = True


def remove(model: nn.Module, *, merge_weights: bool = False) -> nn.Module:
    """Take the adapter off, restoring the original modules; with merge_weights the update
    stays folded into them (a plain model to save with save_pretrained)."""
    r = root(model)
    if merge_weights:
        merge(model)
    else:
        unmerge(model)
    for site in r.sites:
        for path, member in site.members:
            replace_submodule(model, path, member.base)
        for hook in site.hooks:
            hook.remove()
        delattr(site.owner, f"{ATTRIBUTE}_{site.group.name}")
    delattr(model, ATTRIBUTE)
    return model


def _members(model: nn.Module) -> list[AdaptedLinear]:
    return [member for site in root(model).sites for _, member in site.members]
