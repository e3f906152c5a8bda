"""tiedlora adapters served by vLLM, through its LoRA resolver plugin point.

vLLM asks its registered resolvers for an unknown model name in a request. This one reads the
adapter of that name under `TIEDLORA_VLLM_ADAPTERS` (the names `tiedlora serve` gives: a run
folder or an adapter folder, by its path under the root) with tiedlora's one reader, every check
included, exports it losslessly to a PEFT LoRA folder in a bounded cache, and hands vLLM that
folder. Exports need no weights: the base model is built on the meta device from its config
alone, to find the module paths and check the adapter against the base's shapes.

Enable it with `VLLM_PLUGINS=tiedlora VLLM_ALLOW_RUNTIME_LORA_UPDATING=True
TIEDLORA_VLLM_ADAPTERS=<folder>` and vLLM's `--enable-lora --max-lora-rank R`.
`TIEDLORA_VLLM_CACHE` (a folder) and `TIEDLORA_VLLM_CACHE_BYTES` bound the exports; keep the
bound above what vLLM holds itself (`--max-cpu-loras` adapters), since vLLM reads an evicted
adapter's folder again when it reloads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

from ..adapter_file import put, read_adapter
from ..atomic import discard, write_folder
from ..config import TiedLoraError
from ..export import peft_files
from ..model import apply, remove
from ..runs import adapter_folder

DEFAULT_CACHE_BYTES = 4 << 30


class ExportCache:
    """Adapter names to PEFT LoRA folders, exported once each and kept least recently used
    first out past `max_bytes`. Safe from many threads: one export per adapter however many
    requests ask for it at once; other adapters export meanwhile."""

    def __init__(self, adapters: Path, folder: Path, max_bytes: int = DEFAULT_CACHE_BYTES, skeleton=None):
        """`skeleton(base_model)` gives the base's modules (any device); by default built on the
        meta device from the base's config, as vLLM names it (a local folder or a Hub id)."""
        self.adapters, self.folder, self.max_bytes = Path(adapters), Path(folder), max_bytes
        self.make_skeleton = skeleton or meta_model
        self.folder.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()  # guards the fields below, never held while exporting
        self.exporting: dict[str, threading.Lock] = {}
        self.used: OrderedDict[str, int] = OrderedDict()  # export folder name -> bytes, oldest use first
        # Exports are named by a hash of the adapter's name, base and recorded file: what another
        # process or an earlier life left is reused as it is, oldest first in line for eviction.
        for old in sorted(self.folder.iterdir(), key=lambda p: p.stat().st_mtime):
            if old.name.startswith(".") and old.is_dir():
                discard(old)  # a write killed half-way
            elif old.is_dir():
                self.used[old.name] = folder_bytes(old)
        self.skeletons: dict[str, object] = {}
        self.skeleton_lock = threading.Lock()
        self.exports = 0  # how many exports ran: a test counts them

    def resolve(self, base_model: str, name: str) -> Path:
        """The PEFT folder of adapter `name` for `base_model`; TiedLoraError naming the fix if
        there is no such adapter or it fails any check."""
        source = adapter_folder(self.adapters, name)
        adapter = read_adapter(source, tensors=False)  # the config's checks first: cheap, and they name the key
        key = hashlib.sha256(json.dumps([name, base_model, adapter.meta], sort_keys=True).encode()).hexdigest()[:32]
        with self.lock:
            mutex = self.exporting.setdefault(key, threading.Lock())
        with mutex:
            target = self.folder / key
            if not target.is_dir():
                self.export(base_model, source, target)
            with self.lock:
                self.used[key] = self.used.pop(key) if key in self.used else folder_bytes(target)
                self.evict(keep=key)
        return target

    def export(self, base_model: str, source: Path, target: Path) -> None:
        adapter = read_adapter(source)  # every check, the tensors' included
        with self.skeleton_lock:  # one meta model per base, adapted and cleared for each export
            model = self.skeleton(base_model)
            apply(model, adapter.config, device="cpu")
            try:
                put(model, adapter)
                files = peft_files(model)
            finally:
                remove(model)
        write_folder(target, files)
        self.exports += 1

    def skeleton(self, base_model: str):
        if base_model not in self.skeletons:
            self.skeletons[base_model] = self.make_skeleton(base_model)
        return self.skeletons[base_model]

    def evict(self, keep: str) -> None:
        """Drop least recently used exports until the cache fits (never `keep`, just asked for)."""
        while sum(self.used.values()) > self.max_bytes and len(self.used) > 1:
            oldest = next(k for k in self.used if k != keep)
            del self.used[oldest]
            discard(self.folder / oldest)


def meta_model(base_model: str):
    """The base model's modules on the meta device: paths and shapes, no weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_model)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def cache_from_environment() -> ExportCache | None:
    root = os.environ.get("TIEDLORA_VLLM_ADAPTERS")
    if not root:
        return None
    if not Path(root).is_dir():
        raise TiedLoraError(
            f"TIEDLORA_VLLM_ADAPTERS={root!r} is not a folder: set it to a folder of tiedlora adapters."
        )
    folder = os.environ.get("TIEDLORA_VLLM_CACHE") or Path(tempfile.gettempdir()) / "tiedlora-vllm-cache"
    size = os.environ.get("TIEDLORA_VLLM_CACHE_BYTES", str(DEFAULT_CACHE_BYTES))
    if not size.isdigit() or int(size) < 1:
        raise TiedLoraError(f"TIEDLORA_VLLM_CACHE_BYTES={size!r} must be a positive number of bytes, e.g. 4294967296.")
    return ExportCache(Path(root), Path(folder), int(size))


def register() -> None:
    """vLLM's entry point (group `vllm.general_plugins`, name `tiedlora`): registers the
    resolver in every vLLM process that loads plugins; without TIEDLORA_VLLM_ADAPTERS, nothing."""
    import asyncio

    from fastapi import HTTPException
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

    found = cache_from_environment()
    if found is None:
        return
    cache = found  # bound once: the resolver below closes over it

    class TiedLoraResolver(LoRAResolver):
        async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
            try:
                folder = await asyncio.to_thread(cache.resolve, base_model_name, lora_name)
            except TiedLoraError as e:  # vLLM answers an HTTPException with its status and message
                raise HTTPException(status_code=404, detail=str(e)) from None
            return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(folder))

    LoRAResolverRegistry.register_resolver("tiedlora", TiedLoraResolver())
