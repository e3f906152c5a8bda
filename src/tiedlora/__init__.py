"""Tied-LoRA: low-rank adapters whose A and B may be shared by every layer, and whose A, B, u, v
may each be trained or frozen (Renduchintala et al., 2023)."""

from .adapter_file import load, save
from .config import PRESETS, Part, TiedLoraConfig, TiedLoraError
from .export import export_peft
from .model import adapter_parameters, apply, disabled, merge, remove, trainable_parameters, unmerge
from .multi import MultiAdapterModel
from .version import __version__

__all__ = [
    "PRESETS",
    "MultiAdapterModel",
    "Part",
    "TiedLoraConfig",
    "TiedLoraError",
    "__version__",
    "adapter_parameters",
    "apply",
    "disabled",
    "export_peft",
    "load",
    "merge",
    "remove",
    "save",
    "trainable_parameters",
    "unmerge",
]
