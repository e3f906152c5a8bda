"""Checkpoints: a run's adapter, AdamW moments and state, written whole, read back checked."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapter_file import adapter_files, put, read_adapter, regular_file
from ..atomic import discard, json_bytes, write_atomic, write_folder
from ..config import TiedLoraError
from ..model import adapter_parameters
from ..runs import CHECKPOINTS, read_json
from .config import TrainConfig


@dataclass
class TrainState:
    """Where a run stands after its last step: written whole in every checkpoint (`state.json`)
    and read back on resume, so a resumed run goes on exactly where it stopped."""

    step: int = 0
    best: float | None = None  # the best validation value so far (a metric negated: lower is better)
    best_step: int | None = None
    bad_evals: int = 0  # validations in a row without improvement, for early stopping
    tokens: int = 0  # answer tokens trained on
    elapsed_s: float = 0.0  # seconds of training steps
    stopped: str | None = None  # why the run stopped before max_steps


STATE_KEYS = {f.name for f in dataclasses.fields(TrainState)}


class Checkpoints:
    """`checkpoint/step-N/` folders, each written whole (built aside, then renamed into place)
    before `checkpoint/latest` (written atomically) names it; all but it and the one before are
    then removed, each as a unit. A kill at any moment leaves every step-N whole, and a
    checkpoint damaged later is passed over for the one before."""

    def __init__(self, folder: Path):
        self.folder = folder / CHECKPOINTS

    def latest(self) -> Path | None:
        pointer = self.folder / "latest"
        if not pointer.is_file():
            return None
        name = pointer.read_bytes()[:64].decode("utf-8", "replace").strip()
        path = self.folder / name
        if not re.fullmatch(r"step-\d+", name) or not path.resolve().is_relative_to(self.folder.resolve()):
            raise TiedLoraError(
                f"{pointer} names {name!r}, not a step-N folder of this run's; delete {self.folder} to start over."
            )
        if not path.is_dir():
            raise TiedLoraError(f"{pointer} names {path.name}, which is missing; delete {self.folder} to start over.")
        return path

    def steps(self) -> list[Path]:
        """The checkpoints there, newest first."""
        found = [p for p in self.folder.glob("step-*") if re.fullmatch(r"step-\d+", p.name) and p.is_dir()]
        return sorted(found, key=lambda p: -int(p.name.split("-")[1]))

    def write(self, model, optimizer, state: TrainState) -> Path:
        from safetensors.torch import save as to_bytes

        path = self.folder / f"step-{state.step}"
        pointer = self.folder / "latest"
        previous = self.folder / pointer.read_text().strip() if pointer.is_file() else None  # kept, to fall back to
        params = {id(p): k for k, p in adapter_parameters(model).items()}
        moments = {
            f"{params[id(p)]}/{name}": t.detach().cpu().contiguous()
            for p, s in optimizer.state.items()
            for name, t in s.items()
            if torch.is_tensor(t)
        }
        files = adapter_files(model) | {
            "optimizer.safetensors": to_bytes(moments),
            "state.json": json_bytes(dataclasses.asdict(state)),
        }
        write_folder(path, files)
        write_atomic(self.folder / "latest", path.name.encode())
        for old in self.steps():
            if old not in (path, previous):
                discard(old)
        return path

    def read(self, path: Path, model, optimizer) -> TrainState:
        """The training state at `path`, its adapter and AdamW moments put on the model and the
        optimizer; every file is checked before either is touched."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        state = read_json(path / "state.json")
        if not isinstance(state, dict) or set(state) != STATE_KEYS or not isinstance(state["step"], int):
            raise TiedLoraError(f"{path / 'state.json'} is damaged: expected the keys {sorted(STATE_KEYS)}.")
        try:
            moments = load_file(regular_file(path / "optimizer.safetensors"))
        except (SafetensorError, OSError) as e:
            raise TiedLoraError(f"{path / 'optimizer.safetensors'} is damaged ({e}).") from None
        adapter = read_adapter(path)
        params = adapter_parameters(model)
        for key in moments:
            name, _, field = key.rpartition("/")
            if name not in params:
                raise TiedLoraError(f"{path}/optimizer.safetensors has state for {name}, which this adapter lacks.")
        put(model, adapter)
        for key, t in moments.items():
            name, _, field = key.rpartition("/")
            # AdamW keeps its step count on the CPU unless fused or capturable
            optimizer.state[params[name]][field] = t if field == "step" else t.to(params[name].device)
        return TrainState(**state)


def resume_state(checkpoints: Checkpoints, resume: bool, model, optimizer, cfg: TrainConfig, main: bool) -> TrainState:
    """The training state: fresh, or the latest intact checkpoint's (saying so in one line, and
    naming any newer one passed over as damaged)."""
    latest = checkpoints.latest() if resume else None
    if latest is None:
        return TrainState()
    candidates = [latest, *[p for p in checkpoints.steps() if p != latest]]
    damaged = []
    for path in candidates:
        try:
            state = checkpoints.read(path, model, optimizer)
        except TiedLoraError as e:
            damaged.append(str(e))
            continue
        if main:
            passed = f" ({'; '.join(damaged)}: resuming from the checkpoint before)" if damaged else ""
            print(f"tiedlora train: resuming at step {state.step} of {cfg.max_steps} from {path}{passed}", flush=True)
        return state
    raise TiedLoraError(
        f"No intact checkpoint to resume from: {'; '.join(damaged)}. Delete {checkpoints.folder} to start over."
    )
