"""Put a Tied-LoRA adapter on a model, count it, merge it, take it off.

Works on any torch model whose decoder layers sit in an nn.ModuleList (every Hugging Face
causal LM) and whose projections are nn.Linear or GPT-2's Conv1D; transformers is not needed.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .config import PARTS, TiedLoraConfig, TiedLoraError
from .layer import AdaptedLinear, GroupAdapter, Site, TiedParameters, new_parameter, row_slices, tensor_key

# For each group alias, the module names (relative to one shared parent inside a layer) that
# read the group's input, in the order their output rows are split; the first match wins.
GROUP_PATTERNS: dict[str, tuple[tuple[str, ...], ...]] = {
    "qkv": (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("c_attn",), ("query_key_value",),
            ("qkv_proj",), ("Wqkv",), ("W_pack",)),
    "o": (("o_proj",), ("attn.c_proj",), ("attention.dense",), ("self_attention.dense",), ("out_proj",)),
    "mlp_in": (("gate_proj", "up_proj"), ("c_fc",), ("dense_h_to_4h",), ("gate_up_proj",), ("fc1",)),
    "mlp_out": (("down_proj",), ("mlp.c_proj",), ("dense_4h_to_h",), ("fc2",)),
}
ATTRIBUTE = "tiedlora"  # the root module's name on the model, and its state-dict prefix


def apply(model: nn.Module, config: TiedLoraConfig, *, device=None, dtype=torch.float32) -> nn.Module:
    """Adapt `model` in place and return it; every base weight is frozen. Adapter tensors are
    created in `dtype` (fp32 by default, also beside a bf16 base) on the base weights' device,
    or on `device` (e.g. "cpu" for a shape-only base built on the meta device)."""
    if not isinstance(config, TiedLoraConfig):
        raise TiedLoraError(f"config must be a tiedlora.TiedLoraConfig, got {type(config).__name__}; e.g. TiedLoraConfig.preset('tl6', rank=8).")
    if hasattr(model, ATTRIBUTE):
        raise TiedLoraError("This model already carries a Tied-LoRA adapter: call tiedlora.remove(model) first.")
    layers = find_layers(model)
    indices = _layer_indices(config, len(layers))
    first = layers[indices[0]]
    targets = config.targets if isinstance(config.targets, dict) else {a: _find_group(first, a) for a in config.targets}
    shapes = {group: _group_shape(layers, indices, group, members) for group, members in targets.items()}
    for group, (d_in, d_outs) in shapes.items():
        if config.rank > min(d_in, sum(d_outs)):
            raise TiedLoraError(f"rank={config.rank} is larger than the {group!r} projection ({d_in} -> {sum(d_outs)}): use rank <= {min(d_in, sum(d_outs))}.")
    model.requires_grad_(False)

    root = TiedParameters(config)
    prefix = _path_of(model, layers)
    for group, members in targets.items():
        d_in, d_outs = shapes[group]
        part_shapes = {"A": (config.rank, d_in), "B": (sum(d_outs), config.rank), "u": (config.rank,), "v": (sum(d_outs),)}
        place = dict(device=device if device is not None else first.get_submodule(members[0]).weight.device, dtype=dtype)
        tied = nn.ParameterDict({p: new_parameter(config.parts[p], part_shapes[p], config.seed, tensor_key(group, p), **place)
                                 for p in PARTS if config.parts[p].tied})
        root[group] = tied
        for i in indices:
            own = {p: new_parameter(config.parts[p], part_shapes[p], config.seed, tensor_key(group, p, i), **place)
                   for p in PARTS if not config.parts[p].tied}
            adapter = GroupAdapter(tied, own, config.scale, config.dropout, len(members))
            owner = layers[i].get_submodule(_common_parent(members))
            owner.add_module(f"{ATTRIBUTE}_{group}", adapter)
            adapted = []
            for name, rows in zip(members, row_slices(d_outs)):
                member = AdaptedLinear(layers[i].get_submodule(name), adapter, rows)
                _set_submodule(layers[i], name, member)
                adapted.append((f"{prefix}.{i}.{name}", member))
            root.sites.append(Site(i, group, adapter, owner, members, adapted))
    setattr(model, ATTRIBUTE, root)
    return model


def root(model: nn.Module) -> TiedParameters:
    found = getattr(model, ATTRIBUTE, None)
    if not isinstance(found, TiedParameters):
        raise TiedLoraError("This model carries no Tied-LoRA adapter: call tiedlora.apply(model, config) or tiedlora.load(model, folder) first.")
    return found


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every adapter tensor once, under a key that does not depend on where the model is
    wrapped: `<group>.<part>` when tied, `<group>.layers.<i>.<part>` when per layer."""
    r = root(model)
    params = {tensor_key(group, name): p for group, tied in r.items() for name, p in tied.items()}
    for site in r.sites:
        params.update({tensor_key(site.group, name, site.layer): p for name, p in site.adapter.named_parameters()})
    return params


def trainable_parameters(model: nn.Module) -> int:
    """Unique trainable adapter parameters; a tied tensor counts once."""
    return sum(p.numel() for p in adapter_parameters(model).values() if p.requires_grad)


def merge(model: nn.Module) -> nn.Module:
    """Fold the update into every adapted W (exact up to the weights' rounding); a no-op on a
    module already merged."""
    for member in _members(model):
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
        raise TiedLoraError("The adapter is merged into the weights, so it cannot be switched off exactly: call tiedlora.unmerge(model) first.")
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
            _set_submodule(model, path, member.base)
        delattr(site.owner, f"{ATTRIBUTE}_{site.group}")
    delattr(model, ATTRIBUTE)
    return model


def find_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers: the longest nn.ModuleList of one module type."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) and len({type(x) for x in m}) == 1]
    if not lists:
        raise TiedLoraError(f"{type(model).__name__} has no nn.ModuleList of decoder layers; tiedlora adapts transformer stacks such as Hugging Face causal LMs.")
    return max(lists, key=len)


def _path_of(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _members(model: nn.Module) -> list[AdaptedLinear]:
    return [member for site in root(model).sites for _, member in site.members]


def _layer_indices(config: TiedLoraConfig, n_layers: int) -> list[int]:
    if config.layers is None:
        return list(range(n_layers))
    bad = [i for i in config.layers if i >= n_layers]
    if bad:
        raise TiedLoraError(f"layers={list(config.layers)} names layers {bad}, but the model has {n_layers} (0 to {n_layers - 1}).")
    return list(config.layers)


def _find_group(layer: nn.Module, alias: str) -> tuple[str, ...]:
    for names in GROUP_PATTERNS[alias]:
        for parent, module in layer.named_modules():
            if all(_is_projection(_get(module, n)) for n in names):
                return tuple(f"{parent}.{n}" if parent else n for n in names)
    found = _projections(layer)
    raise TiedLoraError(
        f"Found no {alias!r} projections in {type(layer).__name__}; its linear modules are {found}. "
        f"Name them with targets={{'{alias}': [module names relative to one layer]}}, e.g. {{'{alias}': {found[:3]}}}.")


def _group_shape(layers: nn.ModuleList, indices: list[int], group: str, members: tuple[str, ...]) -> tuple[int, tuple[int, ...]]:
    """(d_in, d_out of each member), the same in every adapted layer, as tying needs."""
    seen = None
    for i in indices:
        for name in members:
            module = _get(layers[i], name)
            if not _is_projection(module):
                what = "is missing" if module is None else f"is a {type(module).__name__}, not nn.Linear or Conv1D"
                raise TiedLoraError(f"Target {name!r} of group {group!r} {what} in layer {i}; its linear modules are {_projections(layers[i])}.")
        shapes = [_in_out(layers[i].get_submodule(n)) for n in members]
        if len({d_in for d_in, _ in shapes}) != 1:
            raise TiedLoraError(f"Group {group!r} members {list(members)} read inputs of different sizes {shapes}; a group must share one input x.")
        shape = (shapes[0][0], tuple(d_out for _, d_out in shapes))
        if seen is not None and shape != seen:
            raise TiedLoraError(f"Layer {i}'s {group!r} projections have shape {shape}, layer {indices[0]}'s {seen}; tied tensors need equal shapes: pass layers=[...] of one shape.")
        seen = shape
    return seen


def _projections(layer: nn.Module) -> list[str]:
    return [name for name, m in layer.named_modules() if _is_projection(m)]


def _is_projection(module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _in_out(module: nn.Module) -> tuple[int, int]:
    w = module.weight
    return (w.shape[0], w.shape[1]) if type(module).__name__ == "Conv1D" else (w.shape[1], w.shape[0])


def _get(module: nn.Module, path: str):
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _common_parent(names) -> str:
    parents = {n.rpartition(".")[0] for n in names}
    if len(parents) != 1:
        raise TiedLoraError(f"The members {list(names)} of one group must sit under one parent module.")
    return parents.pop()


def _set_submodule(root_module: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root_module.get_submodule(parent) if parent else root_module, name, module)
