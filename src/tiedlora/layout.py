"""Where a model keeps what tiedlora adapts: its decoder layers and, in each layer, the groups
of projections that read one input (q, k and v read the same x).

Both the adapter (`model.apply`) and the multi-adapter server model find layers and groups
here, so they agree on every model. transformers is not needed: any torch model whose decoder
layers sit in an nn.ModuleList and whose projections are nn.Linear or GPT-2's Conv1D works.
"""

from __future__ import annotations

from typing import NamedTuple, cast

import torch
from torch import nn

from .config import TiedLoraError

# For each group alias, the module names (relative to one shared parent inside a layer) that
# read the group's input, in the order their output rows are split; the first match wins.
GROUP_PATTERNS: dict[str, tuple[tuple[str, ...], ...]] = {
    "qkv": (
        ("q_proj", "k_proj", "v_proj"),
        ("query", "key", "value"),
        ("c_attn",),
        ("query_key_value",),
        ("qkv_proj",),
        ("Wqkv",),
        ("W_pack",),
    ),
    "o": (("o_proj",), ("attn.c_proj",), ("attention.dense",), ("self_attention.dense",), ("out_proj",)),
    "mlp_in": (("gate_proj", "up_proj"), ("c_fc",), ("dense_h_to_4h",), ("gate_up_proj",), ("fc1",)),
    "mlp_out": (("down_proj",), ("mlp.c_proj",), ("dense_4h_to_h",), ("fc2",)),
}


class Group(NamedTuple):
    """One adapted group: its name, its members' paths relative to a layer (in row order), the
    input size they share and each member's output size, equal in every adapted layer."""

    name: str
    members: tuple[str, ...]
    d_in: int
    d_outs: tuple[int, ...]

    @property
    def owner(self) -> str:
        """The members' common parent inside a layer (e.g. "self_attn"), which calls them all."""
        parents = {n.rpartition(".")[0] for n in self.members}
        if len(parents) != 1:
            raise TiedLoraError(
                f"The members {list(self.members)} of group {self.name!r} must sit under one parent module."
            )
        return parents.pop()

    def rows(self) -> list[slice]:
        """Each member's rows of the group's fused output (q, then k, then v)."""
        bounds = [0]
        for d in self.d_outs:
            bounds.append(bounds[-1] + d)
        return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def find_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers: the longest nn.ModuleList of one module type."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) and len({type(x) for x in m}) == 1]
    if not lists:
        raise TiedLoraError(
            f"{type(model).__name__} has no nn.ModuleList of decoder layers; "
            "tiedlora adapts transformer stacks such as Hugging Face causal LMs."
        )
    return max(lists, key=len)


def path_of(model: nn.Module, module: nn.Module) -> str:
    """`module`'s dotted name inside `model`."""
    return next(name for name, m in model.named_modules() if m is module)


def find_groups(layers: nn.ModuleList, indices: list[int], targets) -> list[Group]:
    """The groups `targets` names (aliases from GROUP_PATTERNS, or {group: [module names]}),
    found in the first adapted layer and checked in every other one."""
    first = layers[indices[0]]
    named = targets if isinstance(targets, dict) else {alias: find_group(first, alias) for alias in targets}
    return [Group(name, tuple(members), *_shape(layers, indices, name, members)) for name, members in named.items()]


def find_group(layer: nn.Module, alias: str) -> tuple[str, ...]:
    """The member names of group `alias` in one layer, by the first pattern that matches."""
    for names in GROUP_PATTERNS[alias]:
        for parent, module in layer.named_modules():
            if all(is_projection(_get(module, n)) for n in names):
                return tuple(f"{parent}.{n}" if parent else n for n in names)
    found = projections(layer)
    raise TiedLoraError(
        f"Found no {alias!r} projections in {type(layer).__name__}; its linear modules are {found}. "
        f"Name them with targets={{'{alias}': [module names relative to one layer]}}, e.g. {{'{alias}': {found[:3]}}}."
    )


def _shape(layers: nn.ModuleList, indices: list[int], group: str, members) -> tuple[int, tuple[int, ...]]:
    """(d_in, d_out of each member), the same in every adapted layer, as tying needs."""
    seen = None
    for i in indices:
        for name in members:
            module = _get(layers[i], name)
            if not is_projection(module):
                what = "is missing" if module is None else f"is a {type(module).__name__}, not nn.Linear or Conv1D"
                raise TiedLoraError(
                    f"Target {name!r} of group {group!r} {what} in layer {i}; its linear modules are "
                    f"{projections(layers[i])}."
                )
        shapes = [in_out(layers[i].get_submodule(n)) for n in members]
        if len({d_in for d_in, _ in shapes}) != 1:
            raise TiedLoraError(
                f"Group {group!r} members {list(members)} read inputs of different sizes {shapes}; a group "
                "must share one input x."
            )
        shape = (shapes[0][0], tuple(d_out for _, d_out in shapes))
        if seen is not None and shape != seen:
            raise TiedLoraError(
                f"Layer {i}'s {group!r} projections have shape {shape}, layer {indices[0]}'s {seen}; "
                "tied tensors need equal shapes: pass layers=[...] of one shape."
            )
        seen = shape
    assert seen is not None  # indices is never empty
    return seen


def projections(layer: nn.Module) -> list[str]:
    return [name for name, m in layer.named_modules() if is_projection(m)]


def is_projection(module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def is_conv1d(module) -> bool:
    """GPT-2's Conv1D: a linear map that stores W as d_in x d_out."""
    return type(module).__name__ == "Conv1D"


def in_out(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out). nn.Linear says them itself: a quantized one packs its weight into another shape."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    w = cast(torch.Tensor, module.weight)
    return w.shape[0], w.shape[1]  # Conv1D


def replace_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _get(module: nn.Module, path: str):
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None
