"""How many tenants' adapters share one frozen base model in one batch: each tenant's adapter
lives on its own frame of the base (`frame_of`), and the base's adapted projections become
`Routed` modules that compute W x once for every row and add each tenant's update to its own
rows, a contiguous slice of the batch. The update is the layer's own (`GroupAdapter.project`,
`add_update`): one down-projection and one dropout mask per (layer, group) and tenant, shared by
the group's members as `AdaptedLinear` shares them."""

from __future__ import annotations

import contextlib
import copy
import itertools
from typing import Any

import torch
from torch import nn

from ..layer import AdaptedLinear, GroupAdapter, RowSeeds, SharedInput, add_update

Members = dict[str, AdaptedLinear]  # a tenant's adapted projections by their path in the model


def frame_of(model: nn.Module) -> nn.Module:
    """A copy of `model`'s module tree sharing its parameters, buffers and leaf modules (the
    projections, norms and embeddings themselves): a tenant's adapter goes on a frame (it replaces
    projections inside their parents, which are the frame's own), where it is saved, loaded and
    counted as a solo run's, and the frame's forward is the base's with that adapter alone.
    Sharing the leaves keeps a frame to about a fifth of the module objects, the most of a
    tenant's memory (0.82 MB of module objects per SmolLM2 frame copied whole)."""
    shared: dict[int, Any] = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    shared |= {id(m): m for m in model.modules() if next(m.children(), None) is None}
    return copy.deepcopy(model, memo=shared)


class Segment:
    """One tenant's rows of the batch in flight: its adapted projections, which rows, and those
    rows' example seeds for dropout (None: no dropout, as in validation)."""

    def __init__(self, members: Members, rows: slice, seeds: RowSeeds | None = None):
        self.members, self.rows, self.seeds = members, rows, seeds
        self.shared = SharedInput()  # the last group's h
        self.adapter: GroupAdapter | None = None  # that group

    def down(self, adapter: GroupAdapter, x: torch.Tensor, training: bool) -> torch.Tensor:
        """The tenant's h for this group on its rows, once for all the group's members (q, k and v
        are called one after another on the same x)."""
        if adapter is not self.adapter:  # another group: its own h
            self.shared.clear()
            self.adapter = adapter
        return self.shared.get(x, lambda x: adapter.project(x[self.rows], training, self.seeds))


class Route:
    """Which rows of the batch in flight go through which tenant's adapter."""

    def __init__(self):
        self.segments: list[Segment] = []

    @contextlib.contextmanager
    def __call__(self, segments: list[Segment]):
        self.segments = segments
        try:
            yield
        finally:
            self.segments = []


class Routed(nn.Module):
    """A base projection shared by the tenants: W x once for the whole batch, then each tenant's
    update on its own rows, from its frame's adapter."""

    def __init__(self, base: nn.Module, path: str, route: Route):
        super().__init__()
        self.base, self.path = base, path
        self._route = (route,)  # shared by every routed projection, not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.base(x)
        segments = self._route[0].segments
        if not segments:
            return z
        parts = []
        for segment in segments:
            member = segment.members.get(self.path)
            if member is None:  # this tenant leaves this projection alone
                parts.append(z[segment.rows])
                continue
            # dropout in the base's mode (training steps, not validation): the frames are not its submodules
            h = segment.down(member.adapter, x, self.training)
            parts.append(add_update(z[segment.rows], h, member.adapter.up_weight(member.rows)))
        return parts[0] if len(parts) == 1 else torch.cat(parts)  # one: a tenant's validation or test
