"""The training step against the code before a change, side by side in one process, on the real
SmolLM2-135M: a run alone's step (`train.loop.train_step`, as `tiedlora train --data` takes it) and
a joint step of three tenants (`JointTraining.step`, as `tiedlora train --jobs` takes it).

    python benchmarks/step_versions.py --before 28e1df1 --out benchmarks/step_versions_cpu.json

The package at `--before` is taken from git into a temporary folder under another name
(`tiedlora_before`: the package imports itself only relatively), so both versions load in one
process, each with its own copy of the model, and their steps are timed in alternating rounds
(the machine's drift touches both alike). Each step reads the same rows every round: own data of
SQuAD prompt/completion rows; the solo run tl6 r8 on every group, batch 8 in micro batches of 4;
the tenants tl6 r8, tl5 r8 and lora r4, batches 8, 4 and 8. A ratio is the median over rounds of
the round's now / before; above 1.03 the script exits 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tenants import write_tenant_data  # benchmarks/tenants.py, beside this script
from timing import bounded, cpu_name

GROUPS = ["qkv", "o", "mlp_in", "mlp_out"]


def checkout(ref: str, into: Path) -> None:
    """src/tiedlora at `ref`, as the package `tiedlora_before` in `into`."""
    root = Path(__file__).resolve().parents[1]
    archive = subprocess.run(["git", "archive", ref, "src/tiedlora"], cwd=root, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    (into / "src" / "tiedlora").rename(into / "tiedlora_before")


class Version:
    """One version's solo run and joint run, ready to step."""

    def __init__(self, package: str, data: list[str], out: Path, dropout: float):
        pkg = importlib.import_module(package)
        models, loss = importlib.import_module(f"{package}.models"), importlib.import_module(f"{package}.loss")
        train_mod = importlib.import_module(f"{package}.train")
        loop = importlib.import_module(f"{package}.train.loop")
        tenants = importlib.import_module(f"{package}.train.tenants")
        try:  # the job's class moved and was renamed
            spec = importlib.import_module(f"{package}.train.jobs_file").JobSpec
        except ModuleNotFoundError:
            spec = tenants.Job
        fields = {f.name for f in dataclasses.fields(train_mod.TrainConfig)}
        preset = "preset" if "preset" in fields else "config"  # the option's name before
        common = dict(
            precision="fp32", max_length=256, targets=GROUPS, dropout=dropout, seed=1, max_steps=1000, lr=1e-3
        )
        cfg = train_mod.TrainConfig(
            data=data[0],
            **{preset: "tl6"},
            rank=8,
            batch_size=8,
            micro_batch_size=4,
            out=str(out / "solo"),
            **common,
        )
        model, tokenizer = models.load_model("smollm2-135m")
        pkg.apply(model, cfg.adapter())
        task = cfg.task_data()
        run_data = train_mod.load_data(task, tokenizer, cfg)
        procs = train_mod.Processes.start(cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.peak_lr)
        if hasattr(procs, "wrap"):  # the code before: accelerate's prepare
            loss_fn, optimizer = procs.wrap(model, optimizer)
        else:
            loss_fn = loss.TokenLoss(procs.place(model))
        run = loop.Run(cfg, model, tokenizer, task, run_data, procs, out / "solo", True)
        self.solo = lambda: loop.train_step(run, loss_fn, optimizer, params, 0)

        joint = tenants.JointTraining(models.load_model("smollm2-135m"), out / "joint", shared=common, quiet=True)
        jobs = [("a", "tl6", 8, 8), ("b", "tl5", 8, 4), ("c", "lora", 4, 8)]
        for (name, config, rank, batch), path in zip(jobs, data):
            options = dict(data=path, rank=rank, batch_size=batch, micro_batch_size=4, samples=0, **{preset: config})
            joint.add(spec(name, options))
        joint.admit()
        assert len(joint.active) == 3, joint.status
        self.joint = lambda: joint.step(joint.active)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", required=True, help="The git ref of the code to compare with.")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--bound", type=float, default=1.03)
    p.add_argument("--out")
    args = p.parse_args()
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp())
    checkout(args.before, work)
    sys.path.insert(0, str(work))
    data = write_tenant_data(work / "data", 3, 64, short=False)
    versions = {
        "before": Version("tiedlora_before", data, work / "before", args.dropout),
        "now": Version("tiedlora", data, work / "now", args.dropout),
    }
    times: dict[str, dict[str, list[float]]] = {w: {v: [] for v in versions} for w in ("solo", "joint")}
    for r in range(args.rounds + 1):  # round 0 warms up
        order = list(versions) if r % 2 else list(reversed(versions))
        for what in ("solo", "joint"):
            for name in order:
                start = time.perf_counter()
                getattr(versions[name], what)()
                if r:
                    times[what][name].append(time.perf_counter() - start)
        print(
            f"round {r}", {w: {v: round(t[-1], 2) for v, t in by.items() if t} for w, by in times.items()}, flush=True
        )
    figures = {}
    for what, by in times.items():
        ratios = [now / before for now, before in zip(by["now"], by["before"])]
        figures[what] = {
            "before_s": round(statistics.median(by["before"]), 3),
            "now_s": round(statistics.median(by["now"]), 3),
            "ratio": round(statistics.median(ratios), 3),
        }
    result = {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "before": args.before,
        "now": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "dropout": args.dropout,
        "rounds": args.rounds,
        "figures": figures,
        "bound": args.bound,
    }
    bounded(result, args.out)


if __name__ == "__main__":
    main()
