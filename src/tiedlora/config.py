"""What a Tied-LoRA adapter is, in the paper's symbols.

z = W x + (alpha / r) * diag(v) B diag(u) A x, with A: r x d_in, B: d_out x r, u: r, v: d_out.
Each of A, B, u, v is a `Part`: tied (one tensor shared by every layer) or per layer, trained
or frozen, and how it starts. The eight configurations of the paper's Table 1 are presets.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

PARTS = ("A", "B", "u", "v")
# No sensible adapter needs a scale or a value beyond this; a larger one (alpha 1e300, an init of
# 1e38) only makes every output NaN or empty, so it is refused where it is read.
MAX_MAGNITUDE = 1e6
NAMED_INITS = ("kaiming", "zeros", "ones")
# Target groups the library finds by itself; see `layout.GROUP_PATTERNS` for the module names.
GROUP_ALIASES = ("qkv", "o", "mlp_in", "mlp_out")
# A module's dotted name inside a layer: no empty part, no private or special attribute.
MODULE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_]*(\.[A-Za-z0-9][A-Za-z0-9_]*)*")


def is_number(value, limit: float = MAX_MAGNITUDE) -> bool:
    """A real number (not a bool) within ±limit. Integers are compared exactly: a 400-digit one
    is refused here, where `math.isfinite` would raise OverflowError converting it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return abs(value) <= limit if isinstance(value, int) else math.isfinite(value) and abs(value) <= limit


class TiedLoraError(ValueError):
    """Bad input at the library's boundary: the message names the input and the fix."""


@dataclass(frozen=True)
class Part:
    """One of A, B, u, v. `init` is "kaiming" (Kaiming-uniform, as PEFT's LoRA and VeRA),
    "zeros", "ones" or a number every entry starts at (PEFT's VeRA starts u at 0.1)."""

    tied: bool = False
    trainable: bool = True
    init: str | float = "kaiming"

    def __post_init__(self):
        if not isinstance(self.tied, bool) or not isinstance(self.trainable, bool):
            raise TiedLoraError(f"Part(tied={self.tied!r}, trainable={self.trainable!r}): both must be True or False.")
        named = isinstance(self.init, str) and self.init in NAMED_INITS
        if not (named or is_number(self.init)):
            raise TiedLoraError(
                f"init={self.init!r} is not an initialisation: use one of {NAMED_INITS} "
                f"or a number from -{MAX_MAGNITUDE:g} to {MAX_MAGNITUDE:g}."
            )


def _p(tied: bool, trainable: bool, init) -> Part:
    return Part(tied=tied, trainable=trainable, init=init)


N, ZERO, ONE = "kaiming", "zeros", "ones"
# Table 1 of the paper, part by part (A, B, u, v). tl1 is as printed: A and B random, so it
# does not start at the base model; `init={"A": "zeros"}` gives the zero-start variant.
PRESETS: dict[str, tuple[Part, Part, Part, Part]] = {
    "lora": (_p(False, True, N), _p(False, True, ZERO), _p(False, False, ONE), _p(False, False, ONE)),
    "vera": (_p(True, False, N), _p(True, False, N), _p(False, True, ONE), _p(False, True, ZERO)),
    "tl1": (_p(True, True, N), _p(True, False, N), _p(False, False, ONE), _p(False, False, ONE)),
    "tl2": (_p(True, True, N), _p(True, False, N), _p(False, True, ONE), _p(False, True, ZERO)),
    "tl3": (_p(True, False, N), _p(True, True, ZERO), _p(False, False, ONE), _p(False, False, ONE)),
    "tl4": (_p(True, False, N), _p(True, True, ZERO), _p(False, True, ONE), _p(False, False, ONE)),
    "tl5": (_p(True, True, N), _p(True, True, ZERO), _p(False, False, ONE), _p(False, False, ONE)),
    "tl6": (_p(True, True, N), _p(True, True, N), _p(False, True, ONE), _p(False, True, ZERO)),
}


@dataclass(frozen=True)
class TiedLoraConfig:
    """A point of the Tied-LoRA space.

    `alpha` defaults to `rank` (scale 1), as in the paper. `layers` restricts the adapter to
    those layer indices (the paper's Table 3 puts LoRA on one layer). `targets` names the
    groups to adapt: aliases from GROUP_ALIASES ("qkv", the paper's fused attention input, by
    default), or a mapping from a group name to the module names, relative to one decoder
    layer, that share that group's input (e.g. {"qkv": ["attn.q", "attn.k", "attn.v"]}).
    """

    rank: int = 8
    A: Part = field(default_factory=lambda: PRESETS["lora"][0])
    B: Part = field(default_factory=lambda: PRESETS["lora"][1])
    u: Part = field(default_factory=lambda: PRESETS["lora"][2])
    v: Part = field(default_factory=lambda: PRESETS["lora"][3])
    alpha: float | None = None
    seed: int = 0
    layers: tuple[int, ...] | None = None
    targets: tuple[str, ...] | dict[str, tuple[str, ...]] = ("qkv",)
    dropout: float = 0.0
    name: str = "custom"

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise TiedLoraError(f"rank={self.rank!r} must be a positive integer, e.g. rank=8.")
        for part in PARTS:
            if not isinstance(getattr(self, part), Part):
                raise TiedLoraError(
                    f"{part}={getattr(self, part)!r} must be a tiedlora.Part(tied=..., trainable=..., init=...)."
                )
        if self.alpha is not None and not (is_number(self.alpha) and self.alpha > 0):
            raise TiedLoraError(
                f"alpha={self.alpha!r} must be a positive number up to {MAX_MAGNITUDE:g} (or None for alpha = rank)."
            )
        if not isinstance(self.name, str):
            raise TiedLoraError(f"name={self.name!r} must be a string.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise TiedLoraError(f"seed={self.seed!r} must be an integer from 0 to 2**32 - 1.")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise TiedLoraError(f"dropout={self.dropout!r} must be in [0, 1).")
        if self.layers is not None:
            if not isinstance(self.layers, (list, tuple)):
                raise TiedLoraError(
                    f"layers={self.layers!r} must be a list of layer indices, e.g. [3], or None for all."
                )
            layers = tuple(self.layers)
            if not layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
                raise TiedLoraError(
                    f"layers={self.layers!r} must be a non-empty list of layer indices (0, 1, ...), or None for all."
                )
            object.__setattr__(self, "layers", tuple(sorted(set(layers))))
        object.__setattr__(self, "targets", _normalise_targets(self.targets))

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    @property
    def groups(self) -> tuple[str, ...]:
        """The names of the groups this adapter adapts."""
        return tuple(self.targets)

    @property
    def parts(self) -> dict[str, Part]:
        return {p: getattr(self, p) for p in PARTS}

    def part_shapes(self, d_in: int, d_out: int) -> dict[str, tuple[int, ...]]:
        """Each part's shape on a group reading d_in and writing d_out (summed over its members),
        as the equation has them; the module, the file format and the banks all take them here."""
        r = self.rank
        return {"A": (r, d_in), "B": (d_out, r), "u": (r,), "v": (d_out,)}

    def layer_indices(self, n_layers: int) -> list[int]:
        """The layers this adapter adapts in a stack of `n_layers`, checked against that count."""
        if self.layers is None:
            return list(range(n_layers))
        bad = [i for i in self.layers if i >= n_layers]
        if bad:
            raise TiedLoraError(
                f"layers={list(self.layers)} names layers {bad}, but the model has {n_layers} (0 to {n_layers - 1})."
            )
        return list(self.layers)

    @classmethod
    def preset(cls, name: str, rank: int = 8, *, init: dict | None = None, **options) -> TiedLoraConfig:
        """One of Table 1's configurations; `init={"A": "zeros"}` overrides a part's start,
        `A=Part(...)` a whole part."""
        if name not in PRESETS:
            raise TiedLoraError(f"Unknown preset {name!r}: choose one of {', '.join(PRESETS)}.")
        parts = dict(zip(PARTS, PRESETS[name]))
        parts.update({p: options.pop(p) for p in PARTS if p in options})
        for part, value in (init or {}).items():
            if part not in PARTS:
                raise TiedLoraError(f"init names part {part!r}: parts are {', '.join(PARTS)}.")
            parts[part] = dataclasses.replace(parts[part], init=value)
        return cls(rank=rank, name=name, A=parts["A"], B=parts["B"], u=parts["u"], v=parts["v"], **options)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers) if self.layers is not None else None
        d["targets"] = (
            {k: list(v) for k, v in self.targets.items()} if isinstance(self.targets, dict) else list(self.targets)
        )
        return d

    @classmethod
    def from_dict(cls, data: dict) -> TiedLoraConfig:
        """The inverse of to_dict; unknown or mistyped keys are errors, never ignored."""
        if not isinstance(data, dict):
            raise TiedLoraError(f"An adapter config must be a JSON object, got {type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TiedLoraError(f"Unknown config keys {unknown}: the keys are {sorted(known)}.")
        data = dict(data)
        for part in PARTS:
            if part in data:
                value = data[part]
                part_keys = {f.name for f in dataclasses.fields(Part)}
                if not isinstance(value, dict) or set(value) - part_keys:
                    raise TiedLoraError(
                        f"Config part {part}={value!r} must be an object with keys {sorted(part_keys)}."
                    )
                data[part] = Part(**value)
        return cls(**data)


def _normalise_targets(targets) -> tuple[str, ...] | dict[str, tuple[str, ...]]:
    if isinstance(targets, str):
        targets = (targets,)
    if not isinstance(targets, (dict, list, tuple)):
        raise TiedLoraError(
            f"targets={targets!r}: use a list of groups from {list(GROUP_ALIASES)} or a mapping "
            f"{{group: [module names]}}."
        )
    if isinstance(targets, dict):
        if not targets or not all(
            isinstance(k, str)
            and k.isidentifier()
            and isinstance(v, (list, tuple))
            and v
            and all(isinstance(m, str) and MODULE_NAME.fullmatch(m) for m in v)
            for k, v in targets.items()
        ):
            raise TiedLoraError(
                f"targets={str(targets)[:200]}: a mapping needs group names to non-empty lists of module names "
                "(dotted, without private parts such as '__class__' or '..'), e.g. "
                f"{{'qkv': ['self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj']}}."
            )
        return {k: tuple(v) for k, v in targets.items()}
    targets = tuple(targets)
    bad = [t for t in targets if t not in GROUP_ALIASES]
    if not targets or bad:
        raise TiedLoraError(
            f"targets={list(targets)!r}: use groups from {list(GROUP_ALIASES)} or a mapping {{group: [module names]}}."
        )
    return tuple(dict.fromkeys(targets))
