"""Tied-LoRA: low-rank adapters whose A and B may be shared by every layer, and whose A, B, u, v
may each be trained or frozen (Renduchintala et al., 2023)."""

__version__ = "0.1.0"

from .config import PRESETS, Part, TiedLoraConfig, TiedLoraError
from .io import export_peft, load, save
from .model import adapter_parameters, apply, disabled, merge, remove, trainable_parameters, unmerge
from .multi import MultiAdapterModel

__all__ = [
    "PRESETS", "MultiAdapterModel", "Part", "TiedLoraConfig", "TiedLoraError", "adapter_parameters", "apply", "disabled",
    "export_peft", "load", "merge", "remove", "save", "trainable_parameters", "unmerge",
]
