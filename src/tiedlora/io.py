"""Adapter files: tiny, safe, checked.

A folder holds `adapter.safetensors` (the trained tensors only; frozen ones are regenerated from
the seed) and `adapter_config.json` (the config, the base model's identity and shapes, the
library version and the tensors file's sha256). Tensors are read with safetensors only: a
stranger's file is data, never code. Every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .config import MAX_MAGNITUDE, TiedLoraConfig, TiedLoraError
from .layer import tensor_key
from .layout import Group, find_layers
from .model import adapter_parameters, apply, has_adapter, is_merged, remove, root
from .version import __version__

TENSORS = "adapter.safetensors"
UMASK = os.umask(0o022)  # read once (it can only be read by setting it), and put back at once
os.umask(UMASK)
CONFIG = "adapter_config.json"
FORMAT = "tiedlora"
FORMAT_VERSION = 1
MAX_CONFIG_BYTES = 1 << 20


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


def json_bytes(data) -> bytes:
    """JSON as every file tiedlora writes it: indented, ending in a newline."""
    return (json.dumps(data, indent=2) + "\n").encode()


def write_folder(folder: Path, files: dict[str, bytes]) -> None:
    """Write `files` as the whole of `folder`, as a unit: into a temporary folder beside it, then
    renamed into place, so a reader finds the old folder or the new one, never a mix of the two."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    except OSError as e:
        raise TiedLoraError(f"Could not write {folder}: {e.strerror or e}; nothing was changed there.") from e
    try:
        with contextlib.suppress(OSError):
            tmp.chmod(0o777 & ~UMASK)  # as mkdir would make it, not mkdtemp's 0700
        for name, data in files.items():
            write_atomic(tmp / name, data)
        old = tmp.with_name(tmp.name.removesuffix(".tmp") + ".old.tmp")
        if folder.exists():
            os.rename(folder, old)
        os.rename(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise TiedLoraError(
                f"Could not write {folder}: {e.strerror or e}; the folder there before is unchanged."
            ) from e
        raise


def discard(folder: Path) -> None:
    """Remove `folder` as a unit: it is renamed to a hidden `.tmp` name first, so a kill during
    the removal leaves a leftover that `runs.clean_stale` removes, never a half-deleted folder
    under its own name. Best effort: a folder that cannot be moved is removed where it is."""
    try:
        gone = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
        os.rename(folder, gone)
    except OSError:
        gone = folder
    shutil.rmtree(gone, ignore_errors=True)


class AdapterFile(NamedTuple):
    """An adapter folder as read from disk, checked as far as it can be without a model."""

    folder: Path
    meta: dict
    config: TiedLoraConfig
    tensors: dict[str, torch.Tensor]


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
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1 or not isinstance(groups, dict):
        raise TiedLoraError(
            f'{where}: "base_model" must give "layers" (a positive count) and "groups"; the file is damaged.'
        )
    indices = list(range(layers)) if config.layers is None else list(config.layers)
    if any(i >= layers for i in indices):
        raise TiedLoraError(f"{where}: layers={list(indices)} but the base model has {layers}; the file is damaged.")
    shapes = {}
    for group in config.groups:
        g = groups.get(group)
        sizes = [g.get("d_in"), *g.get("d_out", [])] if isinstance(g, dict) and isinstance(g.get("d_out"), list) else []
        if len(sizes) < 2 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in sizes):
            raise TiedLoraError(
                f'{where}: "base_model.groups.{group}" must give "d_in" and a list "d_out" of positive sizes.'
            )
        d_in, d_out = sizes[0], sum(sizes[1:])
        if config.rank > min(d_in, d_out):
            raise TiedLoraError(
                f"{where}: rank {config.rank} is larger than the {group!r} projection ({d_in} -> {d_out})."
            )
        part_shapes = {"A": (config.rank, d_in), "B": (d_out, config.rank), "u": (config.rank,), "v": (d_out,)}
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


def read_config(folder: Path) -> dict:
    path = regular_file(Path(folder) / CONFIG)
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise TiedLoraError(f"{path} is {path.stat().st_size} bytes, too large for an adapter config; it is not one.")
    try:
        meta = json.loads(path.read_bytes())
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
    if path.stat().st_size > cap:
        raise TiedLoraError(
            f"{path} is {path.stat().st_size:,} bytes, more than its config's tensors can take "
            f"({cap:,}); the file is not this adapter's."
        )
    blob = path.read_bytes()
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
        first: dict[str, Group] = {}
        for site in root(model).sites:
            rows = [m.rows.stop - m.rows.start for _, m in site.members]
            first.setdefault(site.group, Group(site.group, site.names, site.adapter.part("A").shape[1], tuple(rows)))
        groups = first.values()
    config = getattr(model, "config", None)
    return {
        "name_or_path": getattr(config, "_name_or_path", None) or None,
        "model_type": getattr(config, "model_type", None),
        "layers": len(find_layers(model)),
        "groups": {g.name: {"members": list(g.members), "d_in": g.d_in, "d_out": list(g.d_outs)} for g in groups},
    }


def check_base(adapter: AdapterFile, found: dict) -> None:
    """The adapter's base model (its type, layer count and the shapes of the groups it adapts)
    must be `found`, a `base_identity`; the model may have more groups than the adapter uses."""
    saved = adapter.meta["base_model"]
    saved_groups = saved.get("groups")
    want = {"model_type": saved.get("model_type"), "layers": saved.get("layers"), "groups": saved_groups}
    have = {k: found[k] for k in ("model_type", "layers")}
    have["groups"] = {g: found["groups"].get(g) for g in adapter.config.groups}
    if want != have:
        raise TiedLoraError(
            f"{adapter.folder} was made for another base model: expected {want}, found {have}; "
            f"load it on the model it was trained on ({saved.get('name_or_path')})."
        )


def export_peft(model: nn.Module, folder) -> Path:
    """Write a standard PEFT LoRA adapter (what PEFT, vLLM and other LoRA servers read):
    per module A_l = diag(u_l) A and B_l = (alpha/r) diag(v_l) B[rows], with lora_alpha = r."""
    from safetensors.torch import save as to_bytes

    r = root(model)
    rank = r.config.rank
    tensors, paths = {}, []
    with torch.no_grad():
        for site in r.sites:
            a = (site.adapter.part("u").unsqueeze(1) * site.adapter.part("A")).float().cpu().contiguous()
            for path, member in site.members:
                tensors[f"base_model.model.{path}.lora_A.weight"] = a.clone()
                tensors[f"base_model.model.{path}.lora_B.weight"] = (
                    site.adapter.up_weight(member.rows).float().cpu().contiguous()
                )
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
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / "adapter_model.safetensors", to_bytes(tensors))
    write_atomic(folder / "adapter_config.json", json_bytes(peft_config))
    return folder


def _target_names(model: nn.Module, paths: list[str]) -> list[str]:
    """Short names ("q_proj"), as LoRA servers expect, where they pick out exactly the adapted
    modules; full paths where a short name would also catch others (a layer subset, say)."""
    by_short: dict[str, set[str]] = {}
    for name, _ in model.named_modules():
        by_short.setdefault(name.rsplit(".", 1)[-1], set()).add(name)
    adapted = set(paths)
    return sorted({p.rsplit(".", 1)[-1] if by_short[p.rsplit(".", 1)[-1]] <= adapted else p for p in paths})


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, flush it to disk, then rename: a crash leaves
    the old file or the new one, never half of one."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise TiedLoraError(f"Could not write {path}: {e.strerror or e}; nothing was changed there.") from e
    try:
        with contextlib.suppress(OSError):  # a file system without modes keeps its own
            os.fchmod(fd, 0o666 & ~UMASK)  # as open() would make it; mkstemp's 0600 hides it from other users
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise TiedLoraError(
                f"Could not write {path}: {e.strerror or e}; the file there before, if any, is unchanged."
            ) from e
        raise
