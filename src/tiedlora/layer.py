"""The adapted layer: z = W x + (alpha / r) * diag(v) B diag(u) A x.

A group (the attention input projection by default) is one or more linear modules of a layer
that read the same x: Q, K and V. The group's `GroupAdapter` computes h = (u * A) x once and
each member adds its rows of (alpha/r * v * B) h. Tied parts live once, outside the layers, in
`TiedParameters`; a `GroupAdapter` holds the per-layer parts and only a reference to the tied.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Callable
from contextvars import ContextVar
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from .config import Part, TiedLoraConfig
from .layout import Group, is_conv1d


def tensor_key(group: str, part: str, layer: int | None = None) -> str:
    """An adapter tensor's name in files and in the seeded init: `<group>.<part>` when tied
    (layer None), `<group>.layers.<i>.<part>` when per layer. Saving, loading, regenerating
    frozen tensors and serving all depend on this one scheme."""
    return f"{group}.{part}" if layer is None else f"{group}.layers.{layer}.{part}"


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
    value = 0.0 if part.init == "zeros" else 1.0 if part.init == "ones" else float(part.init)
    return torch.full(shape, value)


def down_factor(u: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """diag(u) A, r x d_in: the one place the down-projection's product is formed, for the
    module, the PEFT export and the multi-adapter banks (leading batch dimensions broadcast).
    Scaling the matrix, not the activations, keeps u out of the per-token work."""
    return u.unsqueeze(-1) * A


def up_factor(v: torch.Tensor, B: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """(alpha/r) diag(v) B, d_out x r: the up-projection's product, formed here alone like
    `down_factor`; `scale` is alpha/r (a tensor of one per leading index in the banks)."""
    return (scale * v).unsqueeze(-1) * B


def add_update(z: torch.Tensor, h: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """z + h up^T in one kernel (addmm), no separate delta tensor to allocate and add: a member's
    output from its base output z, its group's h and its rows of the up factor."""
    return torch.addmm(z.reshape(-1, z.shape[-1]), h.reshape(-1, h.shape[-1]), up.to(h.dtype).t()).view(z.shape)


# RowSeeds = per row of the batch in flight, the (seed, length) of each example laid in it, in order.
RowSeeds = list[list[tuple[int, int]]]
# The trainer sets it around a training forward, so that each example's dropout masks come from its
# own seed: a tenant's masks are then the same whoever shares its batch, and a solo run draws the
# same ones. Without it (a user's own loop, the Trainer) dropout is torch's, as PEFT's.
ROW_SEEDS: ContextVar[RowSeeds | None] = ContextVar("tiedlora_row_seeds", default=None)


@contextlib.contextmanager
def row_seeds(rows: RowSeeds | None):
    token = ROW_SEEDS.set(rows)
    try:
        yield
    finally:
        ROW_SEEDS.reset(token)


def drop(x: torch.Tensor, p: float, key: str, rows: RowSeeds | None) -> torch.Tensor:
    """Inverted dropout of x. With `rows` (x is batch x tokens x d_in), each example's mask is
    drawn from a generator seeded by its seed and `key` (which layer and group): it depends on
    nothing else in the batch, nor on how many tokens of padding follow it."""
    if rows is None:
        return F.dropout(x, p, True)
    if x.dim() != 3 or len(rows) != x.shape[0]:
        raise ValueError(f"row seeds for {len(rows)} rows, but the input has shape {tuple(x.shape)}")
    masks = []
    for row in rows:
        parts = []
        for seed, length in row:
            generator = torch.Generator(device=x.device).manual_seed(zlib.crc32(f"{seed}/{key}".encode()))
            parts.append(torch.rand(length, x.shape[-1], generator=generator, device=x.device) >= p)
        fill = x.shape[1] - sum(length for _, length in row)
        parts.append(torch.ones(fill, x.shape[-1], dtype=torch.bool, device=x.device))  # padding: any mask
        masks.append(torch.cat(parts))
    return x * torch.stack(masks).to(x.dtype) / (1 - p)


def new_parameter(part: Part, shape, seed: int, key: str, device, dtype) -> nn.Parameter:
    value = initial_value(part, tuple(shape), seed, key).to(device=device, dtype=dtype)
    return nn.Parameter(value, requires_grad=part.trainable)


class SharedInput:
    """h = f(x) computed once for all members of a group, which read the same x one after
    another (q, k and v inside one attention call). The result is kept only while the owner
    module's forward runs: hooks on the owner drop it when the call starts and when it returns,
    so a member that is never called cannot keep x, h or their autograd graph alive."""

    def __init__(self):
        self._cache: tuple[torch.Tensor, bool, torch.Tensor] | None = None

    def get(self, x: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        grad = torch.is_grad_enabled()
        cache = self._cache
        if cache is not None and cache[0] is x and cache[1] == grad:
            return cache[2]
        h = compute(x)
        self._cache = (x, grad, h)
        return h

    def clear(self, *_) -> None:
        self._cache = None

    @property
    def empty(self) -> bool:
        return self._cache is None

    def attach(self, owner: nn.Module) -> list[RemovableHandle]:
        """Scope the cache to each call of `owner`; the handles undo it."""
        return [owner.register_forward_pre_hook(self.clear), owner.register_forward_hook(self.clear)]


class TiedParameters(nn.ModuleDict):
    """Per group, the tensors shared by every layer: one nn.Parameter each, registered once at
    the model's root (state-dict key `tiedlora.<group>.<part>`) so that DDP and FSDP, which wrap
    the layers, never split or copy them."""

    def __init__(self, config: TiedLoraConfig):
        super().__init__()
        self.config = config
        self.sites: list[Site] = []  # every adapted (layer, group), in layer order; not modules

    def tensors(self) -> dict[str, nn.ParameterDict]:
        """Each group's tied tensors."""
        return {group: cast(nn.ParameterDict, tied) for group, tied in self.items()}


class GroupAdapter(nn.Module):
    """One group of one layer: its own (untied) parts, and the shared down-projection."""

    def __init__(
        self, tied: nn.ParameterDict, own: dict[str, nn.Parameter], scale: float, dropout: float, key: str = ""
    ):
        super().__init__()
        for name, p in own.items():
            self.register_parameter(name, p)
        self._tied = (tied,)  # a reference, not a submodule: the tied tensors are owned at the root
        self.scale = scale
        self.dropout = dropout
        self.key = key  # which layer and group: seeds its dropout masks (`drop`)
        self.enabled = True
        self.shared = SharedInput()

    def extra_repr(self) -> str:
        own = ", ".join(f"{n}={tuple(p.shape)}" for n, p in self._parameters.items() if p is not None)
        tied = ", ".join(f"{n}={tuple(p.shape)}" for n, p in self._tied[0].items())
        return f"own: {own or '-'}; tied: {tied or '-'}; scale={self.scale}"

    def part(self, name: str) -> torch.Tensor:
        own = self._parameters.get(name)
        return own if own is not None else self._tied[0][name]

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """h = (u * A) x, computed once per input for all members (Q, K and V read the same x)."""
        return self.shared.get(x, lambda x: self.project(x, self.training, ROW_SEEDS.get()))

    def project(self, x: torch.Tensor, training: bool, rows: RowSeeds | None) -> torch.Tensor:
        """h = (u * A) dropout(x), the group's one down-projection of an input (dropout only in
        training; `rows`: x's examples' seeds, see `drop`). The joint trainer calls it too, with a
        tenant's rows of the batch."""
        if self.dropout and training:
            x = drop(x, self.dropout, self.key, rows)
        return F.linear(x, self.down_weight().to(x.dtype))

    def down_weight(self) -> torch.Tensor:
        """diag(u) A, shared by the group's members."""
        return down_factor(self.part("u"), self.part("A"))

    def up_weight(self, rows: slice) -> torch.Tensor:
        """(alpha/r) diag(v) B for one member's rows."""
        return up_factor(self.part("v")[rows], self.part("B")[rows], self.scale)

    def factors(self, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """(diag(u) A, (alpha/r) diag(v) B[rows]): this layer's update is their product, so the
        export writes them as LoRA's A and B and the banks must hold exactly them."""
        return self.down_weight(), self.up_weight(rows)

    def delta_weight(self, rows: slice) -> torch.Tensor:
        """The member's full update (alpha/r) diag(v) B diag(u) A, d_out x d_in, for merging."""
        down, up = self.factors(rows)
        return up.float() @ down.float()


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
        return is_conv1d(self.base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.base(x)
        adapter = self.adapter
        if self.merged or not adapter.enabled:
            return z
        return add_update(z, adapter.down(x), adapter.up_weight(self.rows))

    @torch.no_grad()
    def fold(self, sign: int) -> None:
        """W += sign * update, computed in fp32: +1 merges, -1 unmerges."""
        delta = self.adapter.delta_weight(self.rows)
        weight = cast(torch.Tensor, self.base.weight)
        weight.copy_((weight.float() + sign * (delta.T if self.transposed else delta)).to(weight.dtype))


class Site:
    """Where one group of one layer is adapted: the group (its members and shapes), its adapter,
    the adapted members with their paths in the model, and the hooks that scope the adapter's
    shared input to its owner's calls."""

    def __init__(
        self,
        layer: int,
        group: Group,
        adapter: GroupAdapter,
        owner: nn.Module,
        members: list[tuple[str, AdaptedLinear]],
        hooks: list[RemovableHandle],
    ):
        self.layer, self.group, self.adapter, self.members = layer, group, adapter, members
        self.owner = owner  # the module that holds the adapter: the members' common parent
        self.hooks = hooks
