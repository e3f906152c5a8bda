"""The adapter file format: tiny, safe, checked.

A folder holds `adapter.safetensors` (the trained tensors only; frozen ones are regenerated from
the seed) and `adapter_config.json` (the config, the base model's identity and shapes, the
library version and the tensors file's sha256). Tensors are read with safetensors only: a
stranger's file is data, never code. The folder is written as a unit (`atomic`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .atomic import json_bytes, write_atomic, write_folder
from .config import MAX_MAGNITUDE, TiedLoraConfig, TiedLoraError
from .layer import initial_value, tensor_key
from .layout import Group, find_layers
from .model import adapter_parameters, apply, has_adapter, is_merged, remove, root
from .version import __version__

TENSORS = "adapter.safetensors"
CONFIG = "adapter_config.json"
FORMAT = "tiedlora"
FORMAT_VERSION = 1
MAX_CONFIG_BYTES = 1 << 20
# Bounds on the base model a file records, far above any real model's (hundreds of layers,
# widths of tens of thousands), so that what a config makes the reader build stays small.
MAX_LAYERS = 10_000
MAX_WIDTH = 1 << 22


def save(model: nn.Module, folder, *, include_frozen: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Write the adapter to `folder`; frozen tensors too with include_frozen (for readers that
    cannot regenerate them); `dtype` (e.g. torch.bfloat16) halves the file."""
    folder = Path(folder)
    files = adapter_files(model, include_frozen=include_frozen, dtype=dtype)
    if folder.is_dir() and {p.name for p in folder.iterdir()} - set(files):
        for name, data in files.items():  # a folder that holds more (a Trainer's output): file by file, tensors first
            write_atomic(folder / name, data)
    else:
        write_folder(folder, files)
    return folder


def adapter_files(
    model: nn.Module, *, include_frozen: bool = False, dtype: torch.dtype | None = None
) -> dict[str, bytes]:
    """The adapter folder's files by name, for writers that add files of their own to it."""
    from safetensors.torch import save as to_bytes

    params = adapter_parameters(model)
    tensors = {
        k: p.detach().to("cpu", dtype or p.dtype).contiguous()
        for k, p in params.items()
        if include_frozen or p.requires_grad
    }
    blob = to_bytes(tensors)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "config": root(model).config.to_dict(),
        "base_model": base_identity(model),
        "tensors": {
            "file": TENSORS,
            "sha256": hashlib.sha256(blob).hexdigest(),
            "stored": "all" if include_frozen else "trained",
        },
    }
    return {TENSORS: blob, CONFIG: json_bytes(meta)}


class AdapterFile(NamedTuple):
    """An adapter folder as read from disk, checked as far as it can be without a model."""

    folder: Path
    meta: dict
    config: TiedLoraConfig
    tensors: dict[str, torch.Tensor]

    def value(self, group: str, part: str, layer: int, shape: tuple[int, ...]) -> torch.Tensor:
        """Part `part` of `group` at `layer`, in fp32: the stored tensor where the file has it, else
        regenerated from the seed exactly as `apply` made it (readers that keep adapters as
        stored, like the multi-adapter banks, take every tensor through here)."""
        spec = self.config.parts[part]
        key = tensor_key(group, part, None if spec.tied else layer)
        stored = self.tensors.get(key)  # its shape checked by read_adapter, against the base by check_base
        return stored.float() if stored is not None else initial_value(spec, shape, self.config.seed, key)


def read_adapter(folder, tensors: bool = True) -> AdapterFile:
    """The one reader of adapter folders, for `load`, the multi-adapter model and the server:
    every structural and numeric check that needs no model happens here, before any tensor
    reaches one. The config and the base model it records fix every tensor's name and shape, so
    the file's size is capped before it is read, and what frozen parts would allocate is bounded
    by the base's own shapes. Without `tensors`, only the config is read and checked (a server
    registering thousands of adapters reads each one's tensors on its first request)."""
    folder = Path(folder)
    meta = read_config(folder)
    config = TiedLoraConfig.from_dict(meta["config"])
    shapes = tensor_shapes(config, meta["base_model"], stored=meta["tensors"]["stored"], where=folder / CONFIG)
    return AdapterFile(folder, meta, config, read_tensors(folder, meta, shapes) if tensors else {})


def tensor_shapes(config: TiedLoraConfig, base: dict, stored: str, where: Path) -> dict[str, tuple[int, ...]]:
    """The name and shape of every tensor the file must hold, from the config and the recorded
    base model; the config must fit that base (its layers, its groups, a rank within them)."""
    layers, groups = base.get("layers"), base.get("groups")
    if not isinstance(layers, int) or isinstance(layers, bool) or not 1 <= layers <= MAX_LAYERS:
        raise TiedLoraError(
            f'{where}: "base_model" must give "layers" (a count from 1 to {MAX_LAYERS:,}) and "groups"; '
            "the file is damaged."
        )
    if not isinstance(groups, dict):
        raise TiedLoraError(f'{where}: "base_model" must give "layers" and "groups" (an object); the file is damaged.')
    try:
        indices = config.layer_indices(layers)
    except TiedLoraError as e:
        raise TiedLoraError(f"{where}: {e} The file is damaged.") from None
    shapes = {}
    for group in config.groups:
        g = groups.get(group)
        if not isinstance(g, dict):
            g = {}
        sizes = [g.get("d_in"), *g["d_out"]] if isinstance(g.get("d_out"), list) else []
        if len(sizes) < 2 or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 < d <= MAX_WIDTH for d in sizes
        ):
            raise TiedLoraError(
                f'{where}: "base_model.groups.{group}" must give "d_in" and a list "d_out" of positive sizes '
                f"(at most {MAX_WIDTH:,})."
            )
        if isinstance(config.targets, dict) and g.get("members") != list(config.targets[group]):
            raise TiedLoraError(
                f"{where}: targets names the modules {list(config.targets[group])} for group {group!r}, but "
                f'"base_model.groups.{group}.members" records {str(g.get("members"))[:200]}; the file is damaged.'
            )
        d_in, d_out = sizes[0], sum(sizes[1:])
        if config.rank > min(d_in, d_out):
            raise TiedLoraError(
                f"{where}: rank {config.rank} is larger than the {group!r} projection ({d_in} -> {d_out})."
            )
        part_shapes = config.part_shapes(d_in, d_out)
        for part, spec in config.parts.items():
            if spec.trainable or stored == "all":
                for layer in [None] if spec.tied else indices:
                    shapes[tensor_key(group, part, layer)] = part_shapes[part]
    return shapes


def load(model: nn.Module, folder) -> nn.Module:
    """Put the adapter saved in `folder` on `model` (applying its config if the model has no
    adapter yet) and return the model. Everything is checked before the model is touched."""
    return put(model, read_adapter(folder))


def put(model: nn.Module, adapter: AdapterFile) -> nn.Module:
    """`load` for an adapter already read (and checked) by `read_adapter`."""
    folder, config, tensors = adapter.folder, adapter.config, adapter.tensors
    fresh = not has_adapter(model)
    if fresh:
        apply(model, config)
    elif root(model).config != config:
        raise TiedLoraError(
            f"{folder} holds a {config.name!r} adapter with another config than the one on this model; "
            "call tiedlora.remove(model) first."
        )
    try:
        check_base(adapter, base_identity(model))  # with read_adapter's checks: every tensor fits the model
        params = adapter_parameters(model)
        if is_merged(model):
            raise TiedLoraError(
                "The adapter on this model is merged into its weights: call tiedlora.unmerge(model) before "
                "loading another."
            )
        with torch.no_grad():
            for key, t in tensors.items():
                params[key].copy_(t)
    except TiedLoraError:
        if fresh:
            remove(model)
        raise
    return model


def read_bytes(path: Path, limit: int, what: str, not_it: str) -> bytes:
    """The file's bytes, at most `limit` of them: a file over it is refused unread, and one that
    vanishes or fails while it is read (renamed away, a disk error) is a TiedLoraError, not a crash."""
    try:
        size = path.stat().st_size
        if size > limit:
            raise TiedLoraError(f"{path} is {size:,} bytes, more than {what} can take ({limit:,}); {not_it}")
        with open(path, "rb") as f:
            return f.read(limit + 1)
    except OSError as e:
        raise TiedLoraError(f"{path} could not be read ({e.strerror or e}); check the folder and retry.") from None


def read_config(folder: Path) -> dict:
    path = regular_file(Path(folder) / CONFIG)
    blob = read_bytes(path, MAX_CONFIG_BYTES, "an adapter config", "it is not one.")
    try:
        meta = json.loads(blob)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: bad JSON, or an int of 5000 digits
        raise TiedLoraError(
            f"{path} is not valid JSON ({type(e).__name__}: {str(e)[:120]}); re-save the adapter."
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise TiedLoraError(
            f'{path} is not a tiedlora adapter config (no "format": "{FORMAT}"); for a PEFT adapter use peft.'
        )
    expected = {"format", "format_version", "library_version", "config", "base_model", "tensors"}
    if set(meta) != expected or not isinstance(meta["tensors"], dict) or not isinstance(meta["base_model"], dict):
        raise TiedLoraError(f"{path} has keys {sorted(meta)}, expected {sorted(expected)}; the file is damaged.")
    if meta["format_version"] != FORMAT_VERSION or isinstance(meta["format_version"], bool):
        raise TiedLoraError(
            f"{path} has format_version {str(meta['format_version'])[:40]}; this tiedlora reads version "
            f"{FORMAT_VERSION}: upgrade tiedlora, or re-save the adapter with this one."
        )
    if meta["tensors"].get("stored") not in ("trained", "all") or not isinstance(meta["tensors"].get("sha256"), str):
        raise TiedLoraError(f'{path}: "tensors" must give "stored" (trained or all) and "sha256"; the file is damaged.')
    return meta


def regular_file(path: Path) -> Path:
    """`path`, a file of the folder itself: a link could lead anywhere."""
    if path.is_symlink():
        raise TiedLoraError(f"{path} is a link; an adapter folder holds its own files: copy the file there instead.")
    if not path.exists():
        raise TiedLoraError(f"{path} does not exist: pass a folder written by tiedlora.save.")
    if not path.is_file():
        raise TiedLoraError(f"{path} is not a regular file: pass a folder written by tiedlora.save.")
    return path


def read_tensors(folder: Path, meta: dict, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The tensors, each one of `shapes` (names and shapes), float, finite and of sane size."""
    from safetensors import SafetensorError
    from safetensors.torch import load as from_bytes

    path = regular_file(folder / TENSORS)
    cap = sum(8 * math.prod(s) for s in shapes.values()) + (1 << 16) + 256 * len(shapes)  # fp64 values and a header
    blob = read_bytes(path, cap, "its config's tensors", "the file is not this adapter's.")
    if hashlib.sha256(blob).hexdigest() != meta["tensors"]["sha256"]:
        raise TiedLoraError(
            f"{path} does not match the sha256 in {CONFIG}: it was truncated or changed after saving; "
            "re-save or re-download it."
        )
    try:
        tensors = from_bytes(blob)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise TiedLoraError(f"{path} is not a valid safetensors file ({e}).") from None
    if set(tensors) != set(shapes):
        raise TiedLoraError(
            f"{path} holds tensors {sorted(set(tensors) ^ set(shapes))[:6]} that do not match its config; "
            "the file is damaged or was written by another tool."
        )
    for key, t in tensors.items():
        if tuple(t.shape) != shapes[key] or not t.is_floating_point():
            raise TiedLoraError(
                f"{path}: tensor {key} is {t.dtype} {tuple(t.shape)}, expected a float tensor of shape {shapes[key]}."
            )
        if not torch.isfinite(t).all() or t.numel() and t.abs().max() > MAX_MAGNITUDE:
            raise TiedLoraError(
                f"{path}: tensor {key} holds NaN, infinite or absurd values (beyond ±{MAX_MAGNITUDE:g}); "
                "the adapter diverged in training or the file was changed: use an earlier checkpoint."
            )
    return tensors


def base_identity(model: nn.Module, groups: Iterable[Group] | None = None) -> dict:
    """What an adapter must match: the model type, the layer count and each group's member
    names and shapes. `groups` are those adapted on `model` unless given."""
    if groups is None:
        groups = {site.group.name: site.group for site in root(model).sites}.values()
    config = getattr(model, "config", None)
    return {
        "name_or_path": getattr(config, "_name_or_path", None) or None,
        "model_type": getattr(config, "model_type", None),
        "layers": len(find_layers(model)),
        "groups": {g.name: group_record(g) for g in groups},
    }


def group_record(group: Group) -> dict:
    """How a file records a group of the base model: its members and their shapes."""
    return {"members": list(group.members), "d_in": group.d_in, "d_out": list(group.d_outs)}


def check_base(adapter: AdapterFile, found: dict) -> None:
    """The adapter's base model (its type, layer count and the shapes of the groups it adapts)
    must be `found`, a `base_identity`; the model may have more groups than the adapter uses.
    A refusal names the first thing that differs."""
    saved = adapter.meta["base_model"]
    saved_groups = saved.get("groups") if isinstance(saved.get("groups"), dict) else {}
    if (saved.get("model_type"), saved.get("layers")) != (found["model_type"], found["layers"]):
        raise TiedLoraError(
            f"{adapter.folder} was made for another base model: a {saved.get('model_type')!r} model of "
            f"{saved.get('layers')} layers, where this one is a {found['model_type']!r} model of {found['layers']}; "
            "load it on the model it was trained on."
        )
    for group in adapter.config.groups:
        want, have = saved_groups.get(group), found["groups"].get(group)
        if want == have:
            continue
        if have is None:
            raise TiedLoraError(
                f"{adapter.folder} adapts the group {group!r} (the projections {str(want)[:200]}), which this base "
                "model does not have; load it on the model it was trained on."
            )
        raise TiedLoraError(
            f"{adapter.folder} adapts the group {group!r} as {str(want)[:200]}, but this base model's {group!r} is "
            f"{have}: it was made for another base model; load it on the model it was trained on."
        )
