"""Export to a standard PEFT LoRA adapter, which PEFT, vLLM and other LoRA servers read:
each adapted module's LoRA factors are the adapter's own (`GroupAdapter.factors`), so the
export is lossless.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .atomic import json_bytes, write_atomic
from .model import root


def export_peft(model: nn.Module, folder) -> Path:
    """Write `model`'s adapter as a PEFT LoRA folder (`peft_files`), file by file into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in peft_files(model).items():
        write_atomic(folder / name, data)
    return folder


def peft_files(model: nn.Module) -> dict[str, bytes]:
    """The PEFT LoRA folder's files by name: per module lora_A = diag(u_l) A and
    lora_B = (alpha/r) diag(v_l) B[rows], with lora_alpha = r so PEFT's own scale is 1."""
    from safetensors.torch import save as to_bytes

    r = root(model)
    rank = r.config.rank
    tensors, paths = {}, []
    with torch.no_grad():
        for site in r.sites:
            for path, member in site.members:
                down, up = site.adapter.factors(member.rows)
                tensors[f"base_model.model.{path}.lora_A.weight"] = down.float().cpu().contiguous()
                tensors[f"base_model.model.{path}.lora_B.weight"] = up.float().cpu().contiguous()
                paths.append(path)
    config = getattr(model, "config", None)
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": getattr(config, "_name_or_path", None) or None,
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": _target_names(model, paths),
        "fan_in_fan_out": any(m.transposed for site in r.sites for _, m in site.members),
        "inference_mode": True,
    }
    return {"adapter_model.safetensors": to_bytes(tensors), "adapter_config.json": json_bytes(peft_config)}


def _target_names(model: nn.Module, paths: list[str]) -> list[str]:
    """Short names ("q_proj"), as LoRA servers expect, where they pick out exactly the adapted
    modules; full paths where a short name would also catch others (a layer subset, say)."""
    by_short: dict[str, set[str]] = {}
    for name, _ in model.named_modules():
        by_short.setdefault(name.rsplit(".", 1)[-1], set()).add(name)
    adapted = set(paths)
    return sorted({p.rsplit(".", 1)[-1] if by_short[p.rsplit(".", 1)[-1]] <= adapted else p for p in paths})
