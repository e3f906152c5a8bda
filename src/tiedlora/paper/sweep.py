"""Rank sweeps: the grid of tasks x configurations x ranks x learning rates (and the paper's
Table 3 cells, LoRA on one layer), each cell a normal `train` run in its own folder.

A cell with results.json is done and skipped (a diverged one too: its results.json says so);
one with run.json but no results resumes from its checkpoint; `shard=(k, n)` takes every n-th
cell from the k-th, so n machines can split a sweep over one shared folder. Budgets left unset
come from each task's paper recipe.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import PRESETS, TiedLoraError
from ..models import load_model
from ..runs import RESULTS, is_run, load_runs, read_json, write_json
from ..train import Diverged, TrainConfig, from_recipe, train
from .report import select

CELL_FIELDS = ("task", "preset", "rank", "lr", "layers", "model", "out")  # set per cell, not by the budget


@dataclass(frozen=True)
class Cell:
    task: str
    config: str
    rank: int
    lr: float
    layer: int | None = None  # LoRA on this one layer only (Table 3)

    @property
    def name(self) -> str:
        where = f"-L{self.layer}" if self.layer is not None else ""
        return f"{self.task}/{self.config}{where}-r{self.rank}-lr{self.lr:g}"


def grid(tasks, configs, ranks, lrs, layers=()) -> list[Cell]:
    """Rank by rank in the order given, so a sweep cut short by its budget has every task and
    configuration at its first ranks (`--ranks 8,2,32,128` does r = 8 first). `lrs` is a list
    for every configuration, or {configuration: list} (e.g. the ones chosen on validation at
    another rank); Table 3's single-layer cells use LoRA's."""
    if isinstance(lrs, dict):
        missing = [c for c in [*configs, *(["lora"] if layers else [])] if c not in lrs]
        if missing:
            raise TiedLoraError(
                f"--lrs gives no learning rate for {sorted(set(missing))}: name every configuration, e.g. "
                "lora:1e-3,tl6:1e-2."
            )

    def lrs_of(config):
        return lrs[config] if isinstance(lrs, dict) else lrs

    return [
        cell
        for r in ranks
        for t in tasks
        for cell in [Cell(t, c, r, lr) for c in configs for lr in lrs_of(c)]
        + [Cell(t, "lora", r, lr, layer) for layer in layers for lr in lrs_of("lora")]
    ]


def parse_lrs(text: str) -> list[float] | dict[str, list[float]]:
    """ "1e-3,1e-2": these for every configuration; "lora:1e-3,tl6:1e-2,tl6:3e-3": per configuration."""
    try:
        if ":" not in text:
            return [float(v) for v in text.split(",") if v.strip()]
        lrs: dict[str, list[float]] = {}
        for item in text.split(","):
            config, lr = item.split(":")
            lrs.setdefault(config.strip(), []).append(float(lr))
        return lrs
    except ValueError:
        raise TiedLoraError(
            f"--lrs {text!r}: write comma-separated numbers (1e-3,1e-2) or config:lr pairs (lora:1e-3,tl6:1e-2)."
        ) from None


def chosen_lrs(folder, rank: int) -> str:
    """The learning rate of each (configuration) chosen on validation at `rank` in a sweep folder
    of one task, as `--lrs` takes it: to sweep the other ranks at those alone."""
    chosen = select([run for _, run in load_runs(folder)])
    picked = {
        config: run["recipe"]["lr"] for (_, config, r, layer), run in chosen.items() if r == rank and layer is None
    }
    return ",".join(f"{config}:{picked[config]:g}" for config in PRESETS if config in picked)


def parse_shard(text: str) -> tuple[int, int]:
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        k = n = 0
    if not 1 <= k <= n:
        raise TiedLoraError(f"--shard {text!r}: write k/n with 1 <= k <= n, e.g. 2/4 for the second of four machines.")
    return k, n


def recipe(budget: dict, cell: Cell, model: str, out: Path) -> TrainConfig:
    """The task's paper recipe, then the sweep's budget (its unset options: the recipe's), then
    the cell's own values."""
    options = {k: v for k, v in budget.items() if v is not None and k not in CELL_FIELDS}
    return from_recipe(
        {
            **options,
            "task": cell.task,
            "preset": cell.config,
            "rank": cell.rank,
            "lr": cell.lr,
            "model": model,
            "layers": [cell.layer] if cell.layer is not None else None,
            "out": str(out / cell.name),
        }
    )


def _set(budget: dict) -> dict:
    """The options a budget sets: an unset one (None) means the paper's recipe, as does one the
    sweep was written before."""
    return {k: v for k, v in budget.items() if v is not None}


def run_sweep(cells: list[Cell], out, *, model: str, budget: dict, shard=(1, 1), quiet: bool = False) -> list[dict]:
    """Run this shard's cells in order; returns their results. Prints a line per cell."""
    out = Path(out)
    unknown = sorted({c.config for c in cells} - set(PRESETS))
    if unknown:
        raise TiedLoraError(f"--presets names {unknown}: the presets are {', '.join(PRESETS)}.")
    manifest = {"model": model, "budget": budget, "cells": [c.name for c in cells]}
    path = out / "sweep.json"
    if path.is_file():
        saved = read_json(path)
        before, now = _set(saved["budget"]), _set(budget)
        changed = {k: (before.get(k), now.get(k)) for k in before.keys() | now.keys() if before.get(k) != now.get(k)}
        if saved["model"] != model:
            changed["model"] = (saved["model"], model)
        if changed:
            shown = "; ".join(f"--{k} {a!r} there, {b!r} now" for k, (a, b) in sorted(changed.items()))
            raise TiedLoraError(
                f"{out} holds a sweep with another model or budget ({path}: {shown}; None is the task's recipe); "
                "use the same options or another --out."
            )
        manifest["cells"] = sorted(set(saved["cells"]) | set(manifest["cells"]))
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, manifest)
    # A fixed shard's configs are validated before any cell runs.
    configs = [recipe(budget, c, model, out) for c in cells]

    k, n = shard
    mine = [(c, cfg) for i, (c, cfg) in enumerate(zip(cells, configs)) if i % n == k - 1]
    results, started, base = [], time.time(), None
    for done, (cell, cfg) in enumerate(mine, 1):
        folder = Path(cfg.out)
        finished = (folder / RESULTS).is_file()
        t = time.time()
        if not finished and base is None:
            base = load_model(model)  # once per sweep; each cell trains a copy
        if finished:
            result = read_json(folder / RESULTS)
        else:
            try:
                result = train(cfg, resume=is_run(folder), quiet=True, base=base)
            except Diverged as e:  # a learning rate too high for this cell: recorded, and the sweep goes on
                result = {
                    "task": cell.task,
                    "config": cell.config,
                    "rank": cell.rank,
                    "diverged": str(e),
                    "recipe": dataclasses.asdict(cfg),
                }
                write_json(folder / RESULTS, result)
            except (
                torch.OutOfMemoryError
            ) as e:  # the machine's state, not the cell's: left unfinished, so a rerun resumes it
                torch.cuda.empty_cache()
                print(
                    f"[{done}/{len(mine)}] {cell.name}: out of memory ({str(e).splitlines()[0]}); skipped, a "
                    "rerun resumes it",
                    flush=True,
                )
                continue
        results.append(result)
        if not quiet:
            outcome = (
                f"diverged ({result['diverged']})"
                if "diverged" in result
                else "{} {:.2f}, {:,} params".format(*next(iter(result["metrics"].items())), result["params"])
            )
            left = (time.time() - started) / done * (len(mine) - done)
            print(
                f"[{done}/{len(mine)}] {cell.name}: {outcome}, "
                f"{'already done' if finished else f'{time.time() - t:.0f} s'}; about {left / 60:.0f} min to go",
                flush=True,
            )
    return results
