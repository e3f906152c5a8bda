"""The run folder: created for one run (or found holding the same run, to resume), and its log."""

from __future__ import annotations

import csv
import dataclasses
import io
import platform
from pathlib import Path

import torch

from ..atomic import discard, write_atomic
from ..config import TiedLoraError
from ..runs import LOG, RUN, clean_stale, is_run, run_options, write_json
from ..version import __version__
from .config import RESUMABLE, UNRECORDED, TrainConfig


def versions() -> dict:
    import transformers

    return {
        "tiedlora": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


ERROR = "error.json"  # why a joint run's job failed, in its folder


def prepare_folder(cfg: TrainConfig, resume: bool) -> Path:
    """The run folder: new, or (with resume) holding this same run; anything else is an error."""
    folder = Path(cfg.out)
    run_file = folder / RUN
    mine = dataclasses.asdict(cfg)
    if run_file.is_file():
        # An option added after that run was written ran at its default, which keeps the old behaviour.
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)} | UNRECORDED
        theirs = defaults | (run_options(folder) or {})
        if not resume:
            raise TiedLoraError(f"{folder} already holds a run: pass --resume to continue it, or choose another --out.")
        changed = sorted(k for k in set(mine) | set(theirs) if k not in RESUMABLE and mine.get(k) != theirs.get(k))
        if changed:
            diff = ", ".join(f"{k}: {theirs.get(k)!r} -> {mine.get(k)!r}" for k in changed)
            raise TiedLoraError(
                f"--resume with a different config than {run_file} ({diff}); resume with the same options or "
                "choose another --out."
            )
    elif folder.exists() and any(folder.iterdir()):
        raise TiedLoraError(f"{folder} is not empty and holds no tiedlora run: choose another --out.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TiedLoraError(
            f"Cannot create --out {folder} ({e.strerror or e}); choose a folder you can write."
        ) from None
    clean_stale(folder)
    if not run_file.is_file():
        write_json(run_file, {"config": mine, "versions": versions()})
    return folder


def fresh_folder(cfg: TrainConfig, resume: bool) -> Path:
    """The tenant's run folder, as a solo run prepares its own; an earlier refusal's error.json goes.
    A `<tenant>/<name>` job's tenant folder must not be a run itself (nothing would find the runs in it)."""
    folder = Path(cfg.out)
    if is_run(folder.parent):
        raise TiedLoraError(
            f"{folder.parent} holds a run of its own: a job named {folder.parent.name}/{folder.name} cannot put its "
            "run folder inside it; name it otherwise."
        )
    if folder.is_dir() and [p.name for p in folder.iterdir()] == [ERROR]:
        discard(folder / ERROR)  # an earlier attempt refused before its run began
    folder = prepare_folder(cfg, resume)
    discard(folder / ERROR)
    return folder


class Log:
    """log.csv and TensorBoard events in the run folder; on resume both drop what came after the
    checkpoint, so a resumed run's log reads as one run."""

    FIELDS = ("step", "loss", "lr", "tokens_per_s", "val_loss", "val_metric", "elapsed_s")

    def __init__(self, folder: Path, start: int, enabled: bool, tensorboard: bool = True):
        """`tensorboard=False` writes log.csv alone: a joint run of a thousand tenants would
        otherwise hold a thousand event writers, each with its own thread."""
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self.path = folder / LOG
        rows = self.rows_until(start) if self.path.is_file() else []
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, self.FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        write_atomic(self.path, buffer.getvalue().encode())  # a kill here leaves the old log whole
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(folder / "tensorboard"), purge_step=start + 1)

    def rows_until(self, start: int) -> list[dict]:
        """The log's rows up to step `start`; from a damaged row on, none (said in one line)."""
        rows = []
        with self.path.open(newline="", errors="replace") as f:
            for n, row in enumerate(csv.DictReader(f), 2):
                if set(row) != set(self.FIELDS) or not (row["step"] or "").isdigit():
                    print(f"tiedlora train: {self.path} is damaged at line {n}; its rows from there on are dropped.")
                    break
                if int(row["step"]) <= start:
                    rows.append(row)
        return rows

    def write(self, **row):
        if not self.enabled:
            return
        try:
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, self.FIELDS).writerow(row)
            if self.tb is not None:
                for key, value in row.items():
                    if key != "step" and value not in ("", None):
                        self.tb.add_scalar(key, value, row["step"])
                self.tb.flush()
        except OSError as e:
            raise TiedLoraError(
                f"Could not write the log in {self.path.parent} ({e.strerror or e}); the last checkpoint "
                "written stays: free some space, then --resume."
            ) from None

    def close(self):
        if self.tb is not None:
            self.tb.close()
