"""The adapted layer: z = W x + (alpha / r) * diag(v) B diag(u) A x.

A group (the attention input projection by default) is one or more linear modules of a layer
that read the same x: Q, K and V. The group's `GroupAdapter` computes h = (u * A) x once and
each member adds its rows of (alpha/r * v * B) h. Tied parts live once, outside the layers, in
`TiedParameters`; a `GroupAdapter` holds the per-layer parts and only a reference to the tied.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from .config import Part


def tensor_key(group: str, part: str, layer: int | None = None) -> str:
    """An adapter tensor's name in files and in the seeded init: `<group>.<part>` when tied
    (layer None), `<group>.layers.<i>.<part>` when per layer. Saving, loading, regenerating
    frozen tensors and serving all depend on this one scheme."""
    return f"{group}.{part}" if layer is None else f"{group}.layers.{layer}.{part}"


def row_slices(d_outs) -> list[slice]:
    """Each member's rows of a group's fused output (q, then k, then v)."""
    bounds = [0]
    for d in d_outs:
        bounds.append(bounds[-1] + d)
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def initial_value(part: Part, shape: tuple[int, ...], seed: int, key: str) -> torch.Tensor:
    """A part's starting tensor, a function of (seed, key) alone: frozen random tensors are
    regenerated from the seed when an adapter is loaded instead of being stored (as PEFT's
    VeRA does), and one tensor never depends on which others exist or their order."""
    if part.init == "kaiming":
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
        t = torch.empty(shape)
        # As PEFT's LoRA and VeRA: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = last dimension.
        nn.init.kaiming_uniform_(t.view(-1, shape[-1]), a=math.sqrt(5), generator=generator)
        return t
    value = {"zeros": 0.0, "ones": 1.0}.get(part.init, part.init)
    return torch.full(shape, float(value))


def new_parameter(part: Part, shape, seed: int, key: str, device, dtype) -> nn.Parameter:
    value = initial_value(part, tuple(shape), seed, key).to(device=device, dtype=dtype)
    return nn.Parameter(value, requires_grad=part.trainable)


class TiedParameters(nn.ModuleDict):
    """Per group, the tensors shared by every layer: one nn.Parameter each, registered once at
    the model's root (state-dict key `tiedlora.<group>.<part>`) so that DDP and FSDP, which wrap
    the layers, never split or copy them."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.sites: list[Site] = []  # every adapted (layer, group), in layer order; not modules


class GroupAdapter(nn.Module):
    """One group of one layer: its own (untied) parts, and the shared down-projection."""

    def __init__(self, tied: nn.ParameterDict, own: dict[str, nn.Parameter], scale: float, dropout: float, n_members: int):
        super().__init__()
        for name, p in own.items():
            self.register_parameter(name, p)
        self._tied = (tied,)  # a reference, not a submodule: the tied tensors are owned at the root
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.n_members = n_members
        self.enabled = True
        self._cache = None  # (x, h, grad mode, uses): h = (u * A) x shared by the members

    def extra_repr(self) -> str:
        own = ", ".join(f"{n}={tuple(p.shape)}" for n, p in self._parameters.items())
        tied = ", ".join(f"{n}={tuple(p.shape)}" for n, p in self._tied[0].items())
        return f"own: {own or '-'}; tied: {tied or '-'}; scale={self.scale}"

    def part(self, name: str) -> torch.Tensor:
        own = self._parameters.get(name)
        return own if own is not None else self._tied[0][name]

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """h = (u * A) x, computed once per input for all members (Q, K and V read the same x).
        The members are called one after another with the same tensor object; the cache is
        dropped once each has used it, and any other input recomputes."""
        grad = torch.is_grad_enabled()
        cache = self._cache
        if cache is not None and cache[0] is x and cache[2] == grad:
            h, uses = cache[1], cache[3] + 1
        else:
            a = self.part("u").unsqueeze(1) * self.part("A")  # scale the r x d matrix, not activations
            h, uses = F.linear(x if self.dropout is None else self.dropout(x), a.to(x.dtype)), 1
        self._cache = None if uses >= self.n_members else (x, h, grad, uses)
        return h

    def up_weight(self, rows: slice) -> torch.Tensor:
        """(alpha/r) * diag(v) B for one member's rows: d_out x r, so v never touches activations."""
        return (self.scale * self.part("v")[rows]).unsqueeze(1) * self.part("B")[rows]

    def delta_weight(self, rows: slice) -> torch.Tensor:
        """The member's full update (alpha/r) diag(v) B diag(u) A, d_out x d_in, for merging."""
        return self.up_weight(rows).float() @ (self.part("u").unsqueeze(1) * self.part("A")).float()


class AdaptedLinear(nn.Module):
    """A frozen linear map (nn.Linear, or GPT-2's Conv1D with its weight transposed) plus its
    rows of the group's update."""

    def __init__(self, base: nn.Module, adapter: GroupAdapter, rows: slice):
        super().__init__()
        self.base = base
        self._adapter = (adapter,)  # owned by the layer, shared by the group's members
        self.rows = rows
        self.merged = False

    @property
    def adapter(self) -> GroupAdapter:
        return self._adapter[0]

    @property
    def transposed(self) -> bool:
        """GPT-2's Conv1D stores W as d_in x d_out."""
        return type(self.base).__name__ == "Conv1D"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.base(x)
        adapter = self.adapter
        if self.merged or not adapter.enabled:
            return z
        h = adapter.down(x)
        # z + h B'^T in one kernel (addmm), no separate delta tensor to allocate and add
        out = torch.addmm(z.reshape(-1, z.shape[-1]), h.reshape(-1, h.shape[-1]), adapter.up_weight(self.rows).to(x.dtype).t())
        return out.view(z.shape)

    @torch.no_grad()
    def fold(self, sign: int) -> None:
        """W += sign * update, computed in fp32: +1 merges, -1 unmerges."""
        delta = self.adapter.delta_weight(self.rows)
        weight = self.base.weight
        weight.copy_((weight.float() + sign * (delta.T if self.transposed else delta)).to(weight.dtype))


class Site:
    """Where one group of one layer is adapted: its adapter and its members with their paths."""

    def __init__(self, layer: int, group: str, adapter: GroupAdapter, owner: nn.Module, names: tuple[str, ...],
                 members: list[tuple[str, AdaptedLinear]]):
        self.layer, self.group, self.adapter, self.members = layer, group, adapter, members
        self.owner = owner  # the module that holds the adapter: the members' common parent
        self.names = names  # the members' names relative to their layer
