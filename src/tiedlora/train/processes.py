"""Where training runs: one process, or several under torchrun (DDP, or FSDP with --fsdp)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import TiedLoraError
from ..layout import find_layers
from ..model import adapter_parameters, has_adapter
from .config import TrainConfig


def main_process() -> bool:
    """Is this the process that writes run folders and speaks for all? Under torchrun, rank 0
    (read from the environment, so it answers before the processes have started); alone, yes."""
    return os.environ.get("RANK", "0") == "0"


@dataclass
class Processes:
    """Where training runs: one process, or several (DDP, or FSDP with --fsdp) under torchrun."""

    accelerator: Any  # accelerate's Accelerator, imported when training starts
    device: torch.device
    world: int
    rank: int
    fsdp: bool
    bf16: bool

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, cfg: TrainConfig) -> Processes:
        from accelerate import Accelerator

        cuda = torch.cuda.is_available()
        accelerator = Accelerator(
            cpu=not cuda
        )  # its mixed_precision is fixed per process; a sweep runs cells of any precision
        world = accelerator.num_processes
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and native_bf16(accelerator.device))
        return cls(accelerator, accelerator.device, world, accelerator.process_index, cfg.fsdp and world > 1, bf16)

    def on_main(self, work: Callable[[], Any]) -> Any:
        """`work()` on the main process alone, its result (or its TiedLoraError, raised) on every
        process: they all go on, or all fail alike, and none waits for a barrier another skipped."""
        if self.world == 1:
            return work()
        outcome: list[Any] = [None]
        if self.main:
            try:
                outcome[0] = (None, work())
            except TiedLoraError as e:
                outcome[0] = (str(e), None)
        torch.distributed.broadcast_object_list(outcome, src=0)
        error, result = outcome[0]
        if error is not None:
            raise TiedLoraError(error)
        return result

    def sum_gradients(self, params: list[nn.Parameter]) -> None:
        """Sum `params`' gradients over the processes in one all-reduce (each process's loss is
        its rows' share of the global mean, so the sum is the global gradient)."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        for p, part in zip(params, flat.split([g.numel() for g in grads])):
            p.grad = part.view_as(p).clone()

    def place(self, model: nn.Module) -> nn.Module:
        """`model` on this process's device, its decoder layers sharded over the processes under --fsdp."""
        model.to(self.device)
        return shard_layers(model) if self.fsdp else model


def native_bf16(device: torch.device) -> bool:
    """Does `device` compute in bf16 natively? On a CPU without AVX512-BF16 or AMX, bf16 matmuls
    are emulated and many times slower than fp32, so `--precision auto` keeps those in fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def shard_layers(model: nn.Module) -> nn.Module:
    """FSDP for models too large for one device: torch's fully_shard splits each decoder
    layer's frozen weights over the processes and gathers them for its forward and backward.
    An adapter stays whole on every process (tied tensors at the root, per-layer ones ignored
    by FSDP), so saving, loading and gradient sums see plain tensors. Each layer is a root of
    its own (the model is not wrapped), and FSDP keeps a root's weights gathered after its
    forward unless told otherwise: without `reshard_after_forward=True` validation and
    generation, which have no backward to free them, would leave every layer whole."""
    from torch.distributed.fsdp import fully_shard

    adapter = set(adapter_parameters(model).values()) if has_adapter(model) else set()  # --jobs: none on the base
    for layer in find_layers(model):
        fully_shard(layer, reshard_after_forward=True, ignored_params=adapter & set(layer.parameters()))
    return model
