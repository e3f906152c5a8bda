"""Many adapters on one base model, each row of a batch with its own adapter (or none).

Serving adapters are frozen, so each is kept as stored, its tied tensors not expanded per layer.
A group of projections (q, k and v; o; gate and up; down; or any mapping an adapter names) gets
its banks when the first adapter that adapts it loads, one bank per rank bucket (8, 16, 32, ...,
powers of two): per bank, a stack of A matrices (one per adapter when A is tied, one per layer
when not), a stack of B matrices likewise, an index per (adapter, layer) into each, u and v per
adapter and layer, and each adapter's alpha/r. A call gathers its rows' factors diag(u) A and
(alpha/r) diag(v) B (`layer.down_factor`, `layer.up_factor`) from the banks its rows use, for
every layer once (a generate call once for all its steps); each layer then does one batched
matmul down per bank, shared by the group's members, and one up per member. A row computes at
its own adapter's bucket, so one rank-256 adapter costs its own rows, not every row's; a
group none of a row's adapters adapts costs nothing. Id 0 is the base model alone.
"""

from __future__ import annotations

import contextlib
from typing import Any, cast

import torch
from torch import nn

from .adapter_file import AdapterFile, check_base, group_record, read_adapter
from .config import GROUP_ALIASES, TiedLoraConfig, TiedLoraError
from .layer import SharedInput, down_factor, up_factor
from .layout import Group, find_groups, find_layers, in_out, is_projection, replace_submodule

# Ranks above this are refused by default (a bank of rank 256 holds 256 rows of d_in per stored A).
MAX_RANK = 256
SMALLEST_BUCKET = 8

# One adapter's share of a bank: (As, Bs, a_index, b_index, u, v, scale); see Bank.put.
Entry = tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]


def bucket(rank: int) -> int:
    """The bank rank an adapter of `rank` computes at: the next power of two, at least 8."""
    return max(SMALLEST_BUCKET, 1 << (rank - 1).bit_length())


class Bank(nn.Module):
    """One group's adapters of one rank bucket, stacked: A (n_A, r, d_in), B (n_B, d_out, r), and
    per slot u (slots, L, r), v (slots, L, d_out), scale (slots,), a_index, b_index (slots, L)
    into A and B; `slot` maps an adapter id to its slot. Row and slot 0 of each is nothing (id 0,
    and layers an adapter leaves alone). An adapter is written into free rows in place, the
    stacks doubling when full, so loading one costs the same with 10 adapters resident or 1,000.
    They are buffers, so `.to()` moves them with the model, but not persistent ones: adapters
    are saved in their own folders, never in a state dict."""

    A: torch.Tensor
    B: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    scale: torch.Tensor
    a_index: torch.Tensor
    b_index: torch.Tensor

    def __init__(self, n_layers: int, d_in: int, d_out: int, rank: int, device=None, dtype=torch.float32):
        super().__init__()
        self.n_layers, self.d_in, self.d_out, self.rank = n_layers, d_in, d_out, rank
        place = dict(device=device, dtype=dtype)
        for name, t in {
            "A": torch.zeros(1, rank, d_in, **place),
            "B": torch.zeros(1, d_out, rank, **place),
            "u": torch.zeros(1, n_layers, rank, **place),
            "v": torch.zeros(1, n_layers, d_out, **place),
            "scale": torch.zeros(1, **place),
            "a_index": torch.zeros(1, n_layers, dtype=torch.long, device=device),
            "b_index": torch.zeros(1, n_layers, dtype=torch.long, device=device),
        }.items():
            self.register_buffer(name, t, persistent=False)
        self.top = {"A": 1, "B": 1, "slot": 1}  # rows below are taken or in `free`
        self.free: dict[str, list[int]] = {"A": [], "B": [], "slot": []}
        self.held: dict[int, tuple[int, list[int], list[int]]] = {}  # adapter id -> its slot, rows of A and of B
        # the call in progress: its rows' matrices for all layers, and which rows of the batch they are (None: all)
        self.rows_a: torch.Tensor | None = None
        self.rows_b: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None

    def slot_of(self, adapter_id: int) -> int:
        held = self.held.get(adapter_id)
        return 0 if held is None else held[0]

    def select(self, slots: torch.Tensor | None, rows: torch.Tensor | None = None) -> None:
        """Gather the (u * A) and (v * B) of `slots` (one per row computed; 0: none) for every
        layer once per call, so a generate call gathers once for all its steps and a layer does
        one bmm down and one up; `rows`: the rows of the batch they are, None for all of them."""
        if slots is None:
            self.rows_a = self.rows_b = self.rows = None
            return
        self.rows = rows
        self.rows_a = down_factor(self.u[slots], self.A[self.a_index[slots]])  # rows x L x r x d_in
        self.rows_b = up_factor(self.v[slots], self.B[self.b_index[slots]], self.scale[slots].view(-1, 1, 1))

    @torch.no_grad()
    def put(self, adapter_id: int, entry: Entry) -> None:
        """Write one adapter's share as id `adapter_id`, touching no other adapter's rows."""
        a_list, b_list, a_at, b_at, u, v, scale = entry
        rank = a_list[0].shape[0]
        assert rank <= self.rank, "an adapter goes to the bank of its rank's bucket"
        self.clear(adapter_id)
        slot = self.take("slot")
        a_rows, b_rows = [self.take("A") for _ in a_list], [self.take("B") for _ in b_list]
        self.held[adapter_id] = (slot, a_rows, b_rows)
        for row, a in zip(a_rows, a_list):
            self.A[row, :rank] = a.to(self.A)
        for row, b in zip(b_rows, b_list):
            self.B[row, :, :rank] = b.to(self.B)
        # a_at: per layer 0 (not adapted) or the 1-based position of its matrix in a_list
        for at, rows, index in ((a_at, a_rows, self.a_index), (b_at, b_rows, self.b_index)):
            index[slot] = torch.tensor([0, *rows])[at].to(index.device)
        self.u[slot, :, :rank] = u.to(self.u)
        self.v[slot] = v.to(self.v)
        self.scale[slot] = scale

    @torch.no_grad()
    def clear(self, adapter_id: int) -> None:
        """Id `adapter_id` computes nothing here again, and its rows are free for the next adapter."""
        if adapter_id not in self.held:
            return
        slot, a_rows, b_rows = self.held.pop(adapter_id)
        for part, rows in (("A", a_rows), ("B", b_rows)):
            getattr(self, part)[rows] = 0
            self.free[part] += rows
        for t in (self.u, self.v, self.scale, self.a_index, self.b_index):
            t[slot] = 0
        self.free["slot"].append(slot)

    def take(self, part: str) -> int:
        """A free row of A or B, or a free slot, the stacks doubled when none is left."""
        if self.free[part]:
            return self.free[part].pop()
        names = ("u", "v", "scale", "a_index", "b_index") if part == "slot" else (part,)
        if self.top[part] == getattr(self, names[0]).shape[0]:
            for name in names:
                stack = getattr(self, name)
                setattr(self, name, torch.cat([stack, torch.zeros_like(stack)]))
        self.top[part] += 1
        return self.top[part] - 1


class GroupBanks(nn.Module):
    """One group of projections in every layer: its banks, one per rank bucket, and which of
    them the call in progress uses (`active`)."""

    def __init__(self, group: Group, n_layers: int, device, dtype):
        super().__init__()
        self.group, self.n_layers, self.device, self.dtype = group, n_layers, device, dtype
        self.buckets = nn.ModuleDict()
        self.active: list[Bank] = []

    def banks(self) -> list[Bank]:
        return [cast(Bank, b) for b in self.buckets.values()]

    def bank(self, rank: int) -> Bank:
        """The bank an adapter of `rank` goes to, made if it is the first of its bucket."""
        size = bucket(rank)
        if str(size) not in self.buckets:
            d_out = sum(self.group.d_outs)
            self.buckets[str(size)] = Bank(self.n_layers, self.group.d_in, d_out, size, self.device, self.dtype)
        return cast(Bank, self.buckets[str(size)])

    def select(self, ids: list[int] | None) -> None:
        """Each row of the call to the bank of its adapter's bucket. Where one bank serves every
        row that has a share here, it computes the whole batch (the others' rows at its zero
        slot): no row is gathered or scattered. Where several do, each computes its own rows."""
        for bank in self.active:
            bank.select(None)
        self.active = []
        if ids is None:
            return
        per_bank = [(bank, [bank.slot_of(i) for i in ids]) for bank in self.banks()]
        used = [(bank, slots) for bank, slots in per_bank if any(slots)]
        for bank, slots in used:
            if len(used) == 1:
                bank.select(torch.tensor(slots, device=bank.u.device))
            else:
                rows = [i for i, s in enumerate(slots) if s]
                here = torch.tensor([slots[i] for i in rows], device=bank.u.device)
                bank.select(here, torch.tensor(rows, device=bank.u.device))
            self.active.append(bank)


class LayerDown:
    """h = (u * A) x of one layer's group for each bank the call uses, computed once for all
    members (q, k and v read the same x), scoped to the owner's call like the adapter's own
    (layer.SharedInput)."""

    def __init__(self, banks: GroupBanks, layer: int):
        self.banks, self.layer = banks, layer
        self.shared = SharedInput()

    def __call__(self, x: torch.Tensor) -> list[tuple[Bank, torch.Tensor]]:
        return self.shared.get(x, self._down)  # type: ignore[arg-type, return-value]

    def _down(self, x: torch.Tensor) -> list[tuple[Bank, torch.Tensor]]:
        found = []
        for bank in self.banks.active:
            assert bank.rows_a is not None
            xs = x if bank.rows is None else x[bank.rows]
            found.append((bank, torch.bmm(xs, bank.rows_a[:, self.layer].transpose(1, 2).to(x.dtype))))
        return found


class BankedLinear(nn.Module):
    """A frozen projection plus, for each row, its adapter's rows of (v B) diag(u) A x, from each
    group the projection is a member of (one, unless mappings overlap)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self._parts: list[tuple[LayerDown, slice]] = []  # references: a LayerDown is shared by its group's members

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.base(x)
        for down, rows in self._parts:
            for bank, h in down(x):
                assert bank.rows_b is not None
                up = bank.rows_b[:, down.layer, rows].transpose(1, 2).to(x.dtype)
                if bank.rows is None:
                    z = torch.baddbmm(z, h, up)
                else:
                    z = z.index_add(0, bank.rows, torch.bmm(h, up))
        return z


class MultiAdapterModel(nn.Module):
    """A base model and any number of loaded adapters: `forward(..., adapter_ids=ids)` and
    `generate(..., adapter_ids=ids)` with one id per row (0: no adapter); `add` and `remove`
    load and unload adapters at run time. Every group the library adapts is served (q/k/v, o,
    the MLP's input and output, and any mapping of projections an adapter names); ranks above
    `max_rank` are refused."""

    def __init__(self, model: nn.Module, dtype=torch.float32, max_rank: int = MAX_RANK):
        super().__init__()
        self.max_rank = max_rank
        self.model: Any = model.requires_grad_(False)  # a transformers model: its generate is used too
        self.dtype = dtype
        self.names: list[str | None] = []
        self.layers = find_layers(model)
        # every layer's own projections by path, before any is wrapped: groups are found and checked here
        self.projections = [{n: m for n, m in layer.named_modules() if is_projection(m)} for layer in self.layers]
        indices = list(range(len(self.layers)))
        self.aliases: dict[str, Group] = {}
        for alias in GROUP_ALIASES:
            with contextlib.suppress(TiedLoraError):  # a group this architecture does not have
                self.aliases[alias] = find_groups(self.layers, indices, [alias])[0]
        config = getattr(model, "config", None)
        self.model_type = getattr(config, "model_type", None)
        self.groups = nn.ModuleDict()  # GroupBanks by an index, made as adapters need them
        self.keys: dict[tuple[str, ...], str] = {}  # a group's members -> its key in `groups`
        self.held: dict[int, list[Bank]] = {}  # adapter id -> the banks holding its shares
        self.device = next(model.parameters()).device

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
        groups = self.check(adapter)
        entries = {g: self._entry(group, g, adapter) for g, group in groups.items()}
        slot = self.names.index(None) if None in self.names else len(self.names)
        if slot == len(self.names):
            self.names.append(None)
        self.names[slot] = name
        adapter_id = slot + 1
        self.held[adapter_id] = []
        for g, group in groups.items():
            bank = self.group_banks(group).bank(adapter.config.rank)
            bank.put(adapter_id, entries[g])
            self.held[adapter_id].append(bank)
        return adapter_id

    def check(self, adapter: AdapterFile) -> dict[str, Group]:
        """The adapter (its tensors read or not yet) fits this base model and its max_rank; each
        of its groups as found on this model. A refusal names what does not fit."""
        config: TiedLoraConfig = adapter.config
        found = {g: self.resolve(g, config) for g in config.groups}
        identity = {
            "model_type": self.model_type,
            "layers": len(self.layers),
            "groups": {g: None if group is None else group_record(group) for g, group in found.items()},
        }
        check_base(adapter, identity)
        if config.rank > self.max_rank:
            raise TiedLoraError(
                f"{adapter.folder} has rank {config.rank}, more than this server's max_rank of {self.max_rank}; "
                f"serve it with --max_rank {config.rank} or more."
            )
        return cast(dict[str, Group], found)

    def resolve(self, group: str, config: TiedLoraConfig) -> Group | None:
        """Group `group` of an adapter as this model has it (None: it has no such projections):
        an alias by the module names the library finds, a mapping by the names it gives, each a
        projection of the same shape in every layer."""
        if not isinstance(config.targets, dict):
            return self.aliases.get(group)
        members = tuple(config.targets[group])
        if any(m not in layer for layer in self.projections for m in members):
            return None
        sizes = [[in_out(layer[m]) for m in members] for layer in self.projections]
        shapes = {(s[0][0], tuple(d_out for _, d_out in s)) for s in sizes}
        if len(shapes) != 1 or len({d_in for d_in, _ in sizes[0]}) != 1:
            return None  # members of other sizes: no group of this model
        d_in, d_outs = shapes.pop()
        found = Group(group, members, d_in, d_outs)
        found.owner  # noqa: B018 - members under one parent module, or the error that says they must be
        return found

    def group_banks(self, group: Group) -> GroupBanks:
        """The banks of `group`'s projections, made (and its projections wrapped) on first use."""
        key = self.keys.get(group.members)
        if key is not None:
            return cast(GroupBanks, self.groups[key])
        key = self.keys[group.members] = f"g{len(self.keys)}"
        self.groups[key] = banks = GroupBanks(group, len(self.layers), self.device, self.dtype)
        for i, layer in enumerate(self.layers):
            down = LayerDown(banks, i)
            down.shared.attach(layer.get_submodule(group.owner))
            for name, rows in zip(group.members, group.rows()):
                wrapped = layer.get_submodule(name)
                if not isinstance(wrapped, BankedLinear):
                    wrapped = BankedLinear(self.projections[i][name])
                    replace_submodule(layer, name, wrapped)
                wrapped._parts.append((down, rows))
        return banks

    def bank(self, group: str, rank: int = SMALLEST_BUCKET) -> Bank:
        """The bank of adapters of `rank` in the group named `group` (made by the first adapter that adapts it)."""
        for key in self.keys.values():
            banks = cast(GroupBanks, self.groups[key])
            if banks.group.name == group:
                return banks.bank(rank)
        raise TiedLoraError(f"No adapter that adapts the group {group!r} has been loaded.")

    def remove(self, name: str) -> None:
        adapter_id = self.id_of(name)
        self.names[adapter_id - 1] = None
        for bank in self.held.pop(adapter_id, []):
            bank.clear(adapter_id)

    def _entry(self, g: Group, name: str, adapter: AdapterFile) -> Entry:
        """One adapter's share of a group's bank: its parts as `AdapterFile.value` gives them, each
        tied matrix once, unadapted layers pointing at the bank's zero row."""
        config: TiedLoraConfig = adapter.config
        d_out, r, L = sum(g.d_outs), config.rank, len(self.layers)
        sizes = config.part_shapes(g.d_in, d_out)
        adapted = config.layer_indices(L)

        def value(part: str, layer: int) -> torch.Tensor:
            return adapter.value(name, part, layer, sizes[part])

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
        given = None if adapter_ids is None else torch.as_tensor(adapter_ids, dtype=torch.long)
        ids: list[int] | None = None if given is None else given.tolist()
        if (
            given is not None
            and ids is not None
            and (
                given.dim() != 1
                or len(ids) != batch
                or min(ids) < 0
                or max(ids) > len(self.names)
                or any(self.names[i - 1] is None for i in ids if i)
            )
        ):
            raise TiedLoraError(
                f"adapter_ids {adapter_ids!r}: need one id per row ({batch}), each 0 (none) or a loaded adapter's id."
            )
        banks = [cast(GroupBanks, b) for b in self.groups.values()]
        for group in banks:
            group.select(ids)
        try:
            yield
        finally:
            for group in banks:
                group.select(None)
