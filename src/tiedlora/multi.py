"""Many adapters on one base model, each row of a batch with its own adapter (or none).

Serving adapters are frozen, so each is kept as stored, its tied tensors not expanded per layer:
per group, a bank of A matrices (one per adapter when A is tied, one per layer when not), a bank
of B matrices likewise, an index per (adapter, layer) into each bank, u and v per adapter and
layer, and each adapter's alpha/r. A row's adapter is an id: a call gathers its rows' factors
diag(u) A and (alpha/r) diag(v) B (`layer.down_factor`, `layer.up_factor`) for every layer once
(a generate call once for all its steps), and each layer does one batched matmul down, shared by
q, k and v, and one up per projection for the whole batch, whatever the mix of configurations
and ranks (ranks are zero-padded to the largest). Id 0 is the base model alone.
"""

from __future__ import annotations

import contextlib
from typing import Any, cast

import torch
from torch import nn

from .adapter_file import AdapterFile, base_identity, check_base, read_adapter
from .config import TiedLoraConfig, TiedLoraError
from .layer import SharedInput, down_factor, up_factor
from .layout import Group, find_groups, find_layers, replace_submodule

# Ranks above this are refused by default: every row of a batch computes at the largest rank loaded.
MAX_RANK = 64

# One adapter's share of a bank: (As, Bs, a_index, b_index, u, v, scale); see Bank.put.
Entry = tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]


class Bank(nn.Module):
    """One group's adapters, stacked: A (n_A, r, d_in), B (n_B, d_out, r), u (ids, L, r),
    v (ids, L, d_out), scale (ids,), and a_index, b_index (ids, L) into A and B; row 0 of each is
    nothing (id 0, and layers an adapter leaves alone). An adapter is written into free rows in
    place, the stacks doubling when full, so loading one costs the same with 10 adapters
    resident or 1,000; only a rank above every one loaded so far pads the stacks again (they
    stay at that rank). They are buffers, so `.to()` moves them with the model, but not
    persistent ones: adapters are saved in their own folders, never in a state dict."""

    A: torch.Tensor
    B: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    scale: torch.Tensor
    a_index: torch.Tensor
    b_index: torch.Tensor

    def __init__(self, n_layers: int, d_in: int, d_out: int, device=None, dtype=torch.float32):
        super().__init__()
        self.n_layers, self.d_in, self.d_out, self.rank = n_layers, d_in, d_out, 1
        place = dict(device=device, dtype=dtype)
        for name, t in {
            "A": torch.zeros(1, 1, d_in, **place),
            "B": torch.zeros(1, d_out, 1, **place),
            "u": torch.zeros(1, n_layers, 1, **place),
            "v": torch.zeros(1, n_layers, d_out, **place),
            "scale": torch.zeros(1, **place),
            "a_index": torch.zeros(1, n_layers, dtype=torch.long, device=device),
            "b_index": torch.zeros(1, n_layers, dtype=torch.long, device=device),
        }.items():
            self.register_buffer(name, t, persistent=False)
        self.top = {"A": 1, "B": 1}  # rows below are taken or in `free`
        self.free: dict[str, list[int]] = {"A": [], "B": []}
        self.held: dict[int, tuple[list[int], list[int]]] = {}  # adapter id -> its rows of A and of B
        self.rows_a: torch.Tensor | None = None  # the call in progress's per-row matrices, all layers
        self.rows_b: torch.Tensor | None = None

    def select(self, ids: torch.Tensor | None) -> None:
        """Gather each row's (u * A) and (v * B) for every layer once per call, so a generate
        call gathers once for all its steps and a layer does one bmm down and one up."""
        if ids is None:
            self.rows_a = self.rows_b = None
            return
        self.rows_a = down_factor(self.u[ids], self.A[self.a_index[ids]])  # rows x L x r x d_in
        self.rows_b = up_factor(self.v[ids], self.B[self.b_index[ids]], self.scale[ids].view(-1, 1, 1))  # x d_out x r

    @torch.no_grad()
    def put(self, adapter_id: int, entry: Entry) -> None:
        """Write one adapter's share as id `adapter_id`, touching no other adapter's rows."""
        a_list, b_list, a_at, b_at, u, v, scale = entry
        rank = a_list[0].shape[0]
        if rank > self.rank:
            self.pad_rank(rank)
        self.clear(adapter_id)
        a_rows, b_rows = [self.take("A") for _ in a_list], [self.take("B") for _ in b_list]
        self.held[adapter_id] = (a_rows, b_rows)
        for row, a in zip(a_rows, a_list):
            self.A[row, :rank] = a.to(self.A)
        for row, b in zip(b_rows, b_list):
            self.B[row, :, :rank] = b.to(self.B)
        # a_at: per layer 0 (not adapted) or the 1-based position of its matrix in a_list
        for at, rows, index in ((a_at, a_rows, self.a_index), (b_at, b_rows, self.b_index)):
            where = torch.tensor([0, *rows])[at]
            index[adapter_id] = where.to(index.device)
        self.u[adapter_id, :, :rank] = u.to(self.u)
        self.v[adapter_id] = v.to(self.v)
        self.scale[adapter_id] = scale

    @torch.no_grad()
    def clear(self, adapter_id: int) -> None:
        """Id `adapter_id` computes nothing again, and its rows are free for the next adapter."""
        self.grow_ids(adapter_id + 1)
        a_rows, b_rows = self.held.pop(adapter_id, ([], []))
        for part, rows in (("A", a_rows), ("B", b_rows)):
            getattr(self, part)[rows] = 0
            self.free[part] += rows
        for t in (self.u, self.v, self.scale, self.a_index, self.b_index):
            t[adapter_id] = 0

    def take(self, part: str) -> int:
        """A free row of A or B, the stack doubled when none is left."""
        if self.free[part]:
            return self.free[part].pop()
        stack = getattr(self, part)
        if self.top[part] == stack.shape[0]:
            setattr(self, part, torch.cat([stack, torch.zeros_like(stack)]))
        self.top[part] += 1
        return self.top[part] - 1

    def grow_ids(self, count: int) -> None:
        """Room for ids below `count`, doubling."""
        have = self.u.shape[0]
        if count > have:
            more = max(count, 2 * have) - have
            for name in ("u", "v", "scale", "a_index", "b_index"):
                t = getattr(self, name)
                setattr(self, name, torch.cat([t, t.new_zeros(more, *t.shape[1:])]))

    def pad_rank(self, rank: int) -> None:
        """Zero-pad every stored matrix to `rank`: zeros add nothing to any product."""
        gap = rank - self.rank
        self.A = torch.cat([self.A, self.A.new_zeros(self.A.shape[0], gap, self.d_in)], dim=1)
        self.B = torch.cat([self.B, self.B.new_zeros(self.B.shape[0], self.d_out, gap)], dim=2)
        self.u = torch.cat([self.u, self.u.new_zeros(self.u.shape[0], self.n_layers, gap)], dim=2)
        self.rank = rank


class LayerDown:
    """h = (u * A) x of one layer's group for each row, computed once for all members (q, k and
    v read the same x), scoped to the owner's call like the adapter's own (layer.SharedInput)."""

    def __init__(self, bank: Bank, layer: int):
        self.bank, self.layer = bank, layer
        self.shared = SharedInput()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.get(x, self._down)

    def _down(self, x: torch.Tensor) -> torch.Tensor:
        assert self.bank.rows_a is not None
        return torch.bmm(x, self.bank.rows_a[:, self.layer].transpose(1, 2).to(x.dtype))


class BankedLinear(nn.Module):
    """A frozen projection plus, for each row, its adapter's rows of (v B) diag(u) A x."""

    def __init__(self, base: nn.Module, down: LayerDown, rows: slice):
        super().__init__()
        self.base = base
        self.rows = rows
        self._down = (down,)  # a reference: shared by the layer's members

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.base(x)
        down = self._down[0]
        b = down.bank.rows_b
        if b is None:
            return z
        return torch.baddbmm(z, down(x), b[:, down.layer, self.rows].transpose(1, 2).to(x.dtype))


class MultiAdapterModel(nn.Module):
    """A base model and any number of loaded adapters: `forward(..., adapter_ids=ids)` and
    `generate(..., adapter_ids=ids)` with one id per row (0: no adapter); `add` and `remove`
    load and unload adapters at run time. Ranks above `max_rank` are refused: the banks are
    padded to the largest rank loaded, so one large adapter would slow every row."""

    def __init__(self, model: nn.Module, targets=("qkv",), dtype=torch.float32, max_rank: int = MAX_RANK):
        super().__init__()
        self.max_rank = max_rank
        self.model: Any = model.requires_grad_(False)  # a transformers model: its generate is used too
        self.dtype = dtype
        self.names: list[str | None] = []
        self.layers = find_layers(model)
        indices = list(range(len(self.layers)))
        self.groups: dict[str, Group] = {g.name: g for g in find_groups(self.layers, indices, targets)}
        self.identity = base_identity(model, self.groups.values())
        self.banks = nn.ModuleDict()
        device = next(model.parameters()).device
        for g in self.groups.values():
            self.banks[g.name] = bank = Bank(len(self.layers), g.d_in, sum(g.d_outs), device, dtype)
            for i in indices:
                down = LayerDown(bank, i)
                down.shared.attach(self.layers[i].get_submodule(g.owner))
                for name, rows in zip(g.members, g.rows()):
                    replace_submodule(
                        self.layers[i], name, BankedLinear(self.layers[i].get_submodule(name), down, rows)
                    )

    def bank(self, group: str) -> Bank:
        return cast(Bank, self.banks[group])

    def id_of(self, name: str) -> int:
        if name not in self.names:
            raise TiedLoraError(f"No adapter named {name!r} is loaded; loaded: {[n for n in self.names if n]}.")
        return self.names.index(name) + 1

    def add(self, name: str, folder) -> int:
        """Load the adapter saved in `folder` (by tiedlora.save) as `name`; returns its id."""
        return self.put(name, read_adapter(folder))

    def put(self, name: str, adapter: AdapterFile) -> int:
        """`add` for an adapter already read (and checked) by `read_adapter`."""
        if not name or name in self.names:
            raise TiedLoraError(f"Adapter name {name!r} is empty or already loaded: choose another.")
        self.check(adapter)
        entries = {g: self._entry(g, adapter) for g in adapter.config.groups}
        slot = self.names.index(None) if None in self.names else len(self.names)
        if slot == len(self.names):
            self.names.append(None)
        self.names[slot] = name
        for g in self.groups:
            if g in entries:
                self.bank(g).put(slot + 1, entries[g])
            else:
                self.bank(g).clear(slot + 1)
        return slot + 1

    def check(self, adapter: AdapterFile) -> None:
        """The adapter (its tensors read or not yet) fits this base model and its max_rank."""
        check_base(adapter, self.identity)
        if adapter.config.rank > self.max_rank:
            raise TiedLoraError(
                f"{adapter.folder} has rank {adapter.config.rank}, more than this model's max_rank of {self.max_rank} "
                "(every row of a batch computes at the largest rank loaded); serve it with a larger max_rank."
            )

    def remove(self, name: str) -> None:
        adapter_id = self.id_of(name)
        self.names[adapter_id - 1] = None
        for g in self.groups:
            self.bank(g).clear(adapter_id)

    def _entry(self, group: str, adapter: AdapterFile) -> Entry:
        """One adapter's share of a group's bank: its parts as `AdapterFile.value` gives them, each
        tied matrix once, unadapted layers pointing at the bank's zero row."""
        config: TiedLoraConfig = adapter.config
        g = self.groups[group]
        d_out, r, L = sum(g.d_outs), config.rank, len(self.layers)
        sizes = config.part_shapes(g.d_in, d_out)
        adapted = config.layer_indices(L)

        def value(part: str, layer: int) -> torch.Tensor:
            return adapter.value(group, part, layer, sizes[part])

        mats, index = {}, {}
        for part in ("A", "B"):
            tied = config.parts[part].tied
            mats[part] = [value(part, layer) for layer in (adapted[:1] if tied else adapted)]
            # per layer: 0 where not adapted, else this adapter's 1-based matrix for that layer
            index[part] = torch.tensor(
                [0 if layer not in adapted else 1 if tied else 1 + adapted.index(layer) for layer in range(L)]
            )
        u = torch.stack([value("u", layer) if layer in adapted else torch.zeros(r) for layer in range(L)])
        v = torch.stack([value("v", layer) if layer in adapted else torch.zeros(d_out) for layer in range(L)])
        return mats["A"], mats["B"], index["A"], index["B"], u, v, config.scale

    def forward(self, *args, adapter_ids=None, **kwargs):
        with self._rows(adapter_ids, args, kwargs):
            return self.model(*args, **kwargs)

    @torch.no_grad()
    def generate(self, *args, adapter_ids=None, **kwargs):
        """transformers' generate, each row with its adapter."""
        with self._rows(adapter_ids, args, kwargs):
            return self.model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def _rows(self, adapter_ids, args, kwargs):
        """Every BankedLinear reads its rows' matrices, gathered for the call in progress; ids checked first."""
        batch = (args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))).shape[0]
        device = next(self.model.parameters()).device
        ids = None if adapter_ids is None else torch.as_tensor(adapter_ids, dtype=torch.long, device=device)
        if ids is not None and (
            ids.shape != (batch,)
            or ids.min() < 0
            or ids.max() > len(self.names)
            or any(self.names[i - 1] is None for i in ids.tolist() if i)
        ):
            raise TiedLoraError(
                f"adapter_ids {adapter_ids!r}: need one id per row ({batch}), each 0 (none) or a loaded adapter's id."
            )
        for group in self.groups:
            self.bank(group).select(ids)
        try:
            yield
        finally:
            for group in self.groups:
                self.bank(group).select(None)
