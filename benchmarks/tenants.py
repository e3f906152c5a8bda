"""Many tenants trained together (`tiedlora train --jobs`) against training them apart, in one run.

    # 8 tenants (tl5, tl6, lora, rank 8), 64 SQuAD rows each, 1 epoch, SmolLM2-135M: three ways
    python benchmarks/tenants.py compare --out /tmp/tenants --json benchmarks/tenants_cpu.json
    # 1,000 tl5 rank-8 tenants of 16 rows each in one process: memory per tenant, step time
    python benchmarks/tenants.py scale --out /tmp/tenants-scale --count 1000 --json benchmarks/tenants_scale_cpu.json

`compare` times, one after the other on the same machine: the 8 solo `tiedlora train --data`
processes run one after another (each loads the model), the 8 solo runs in one Python process
(the model loaded once, as a sweep does), and the 8 as jobs of one joint run; then how far each
joint adapter is from its solo one. Rows are SQuAD validation rows as prompt/completion own data
("Context: ... Question: ... Answer:" and the first answer), cut to --max_length.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from timing import cpu_name  # benchmarks/timing.py, beside this script

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "squad" / "validation.jsonl"
CONFIGS = ["tl5", "tl6", "lora"]


def squad_rows() -> list[dict]:
    return [json.loads(line) for line in DATA.read_text().splitlines()]


def write_tenant_data(
    folder: Path, count: int, rows_each: int, short: bool, suffix: str = "", offset: int = 0
) -> list[str]:
    """`count` files of `rows_each` rows, tenant i from row offset + i * rows_each on (wrapping round)."""
    rows = squad_rows()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"t{i:04d}{suffix}.jsonl"
        with path.open("w") as f:
            for j in range(rows_each):
                r = rows[(offset + i * rows_each + j) % len(rows)]
                prompt = f"Question: {r['question']}\nAnswer:"
                if not short:
                    prompt = f"Context: {r['context'][:600]}\n{prompt}"
                f.write(json.dumps({"prompt": prompt, "completion": " " + r["answers"]["text"][0]}) + "\n")
        paths.append(str(path))
    return paths


def compare(args) -> None:
    import torch
    from safetensors.torch import load_file

    from tiedlora.models import load_model
    from tiedlora.train import TrainConfig, train
    from tiedlora.train.jobs_file import JobSpec
    from tiedlora.train.tenants import train_jobs

    out = Path(args.out)
    paths = write_tenant_data(out / "data", args.tenants, args.rows, short=False)
    options = dict(rank=8, batch_size=args.batch_size, micro_batch_size=8, max_steps=args.rows // args.batch_size)
    options.update(val_every=10_000, val_rows=8, samples=0, max_length=args.max_length, lr=1e-3, warmup_steps=1)
    options["precision"] = args.precision
    jobs = {f"t{i}": {**options, "data": p, "preset": CONFIGS[i % 3], "seed": i} for i, p in enumerate(paths)}
    figures: dict = {"tenants": args.tenants, "rows_each": args.rows, "steps_each": options["max_steps"]}
    figures["torch_threads"] = torch.get_num_threads()

    start = time.perf_counter()
    for name, job in jobs.items():
        flags = [f"--{k}={v}" for k, v in {**job, "out": out / "processes" / name}.items()]
        subprocess.run([sys.executable, "-m", "tiedlora", "train", *flags, "--quiet"], check=True, capture_output=True)
    figures["solo_processes_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(figures), flush=True)

    start = time.perf_counter()
    base = load_model("smollm2-135m")
    for name, job in jobs.items():
        train(TrainConfig(**job, out=str(out / "in_process" / name)), quiet=True, base=base)
    figures["solo_in_one_process_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(figures), flush=True)

    start = time.perf_counter()
    base = load_model("smollm2-135m")
    shared = {"precision": args.precision}
    summary = train_jobs(
        [JobSpec(n, {k: v for k, v in j.items() if k != "precision"}) for n, j in jobs.items()],
        base,
        out / "joint",
        shared=shared,
        quiet=True,
    )
    figures["joint_s"] = round(time.perf_counter() - start, 1)
    assert all(s["status"] == "succeeded" for s in summary.values()), summary
    figures["speedup_vs_processes"] = round(figures["solo_processes_s"] / figures["joint_s"], 2)
    figures["speedup_vs_one_process"] = round(figures["solo_in_one_process_s"] / figures["joint_s"], 2)
    worst = 0.0
    for name in jobs:
        a = load_file(out / "processes" / name / "best" / "adapter.safetensors")
        b = load_file(out / "joint" / name / "best" / "adapter.safetensors")
        scale = max(t.abs().max().item() for t in a.values())
        worst = max(worst, max((a[k] - b[k]).abs().max().item() for k in a) / scale)
    figures["max_abs_diff_over_max_abs_weight"] = worst
    print(json.dumps(figures), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


def scale(args) -> None:
    """`count` tl5 tenants of `rows` short rows each (the question alone). Memory: all of them
    admitted at once (frame, data, optimizer), the process's resident memory before and after,
    per tenant, beside the adapter and AdamW bytes it needs. Time: the whole run with at most
    `max_active` at once (activations grow with the rows in flight), a joint step's time per
    tenant against one tenant's step alone, and every run folder complete."""
    import shutil

    import psutil
    import torch

    from tiedlora.model import adapter_parameters
    from tiedlora.models import load_model
    from tiedlora.train.jobs_file import JobSpec
    from tiedlora.train.tenants import JointTraining

    out = Path(args.out)
    paths = write_tenant_data(out / "data", args.count, args.rows, short=True)
    # a validation file each: 16 rows leave a 10 % hash hold-out empty for ~18 % of tenants, which are then refused
    held_out = write_tenant_data(out / "data", args.count, 2, short=True, suffix="-val", offset=args.count * args.rows)
    options = dict(preset="tl5", rank=8, batch_size=args.rows, micro_batch_size=args.micro_batch_size, max_steps=1)
    options.update(val_every=1, val_rows=2, samples=0, max_length=64, lr=1e-3, warmup_steps=1)
    jobs = [
        JobSpec(f"t{i:04d}", {**options, "data": path, "validation": val, "seed": i})
        for i, (path, val) in enumerate(zip(paths, held_out))
    ]
    base = load_model("smollm2-135m")
    shared = {"precision": args.precision}
    process = psutil.Process()

    held = JointTraining(base, out / "memory", shared=shared, quiet=True)
    for job in jobs:
        held.add(job)
    before = process.memory_info().rss
    held.admit()
    rss_per_tenant = (process.memory_info().rss - before) // len(held.active)
    model = held.active[0].run.model
    state_bytes = sum(
        p.numel() * p.element_size() * (3 if p.requires_grad else 1) for p in adapter_parameters(model).values()
    )
    one = held.active[:1]
    held.step(one)  # warm-up
    t0 = time.perf_counter()
    held.step(one)
    one_step_s = time.perf_counter() - t0
    held.active.clear()
    held.unroute()
    del held, model, one
    shutil.rmtree(out / "memory")

    joint = JointTraining(base, out / "runs", shared=shared, max_active=args.max_active, quiet=False)
    step_times: list[float] = []
    real_step = joint.step

    def timed(tenants):
        t = time.perf_counter()
        result = real_step(tenants)
        step_times.append((time.perf_counter() - t) / len(tenants))
        return result

    joint.step = timed  # type: ignore[method-assign]
    for job in jobs:
        joint.add(job)
    start = time.perf_counter()
    summary = joint.run()
    wall = time.perf_counter() - start
    parts = ("run.json", "log.csv", "checkpoint/latest", "best/adapter.safetensors", "results.json")
    figures = {
        "tenants": args.count,
        "rows_each": args.rows,
        "max_active": args.max_active,
        "succeeded": sum(s["status"] == "succeeded" for s in summary.values()),
        "run_folders_complete": sum(all((out / "runs" / n / f).exists() for f in parts) for n in summary),
        "wall_s": round(wall, 1),
        "joint_steps": joint.steps,
        "adapter_and_adamw_bytes_per_tenant": state_bytes,
        "rss_bytes_per_admitted_tenant": rss_per_tenant,
        "one_tenant_step_s": round(one_step_s, 3),
        "joint_step_s_per_tenant_median": round(sorted(step_times)[len(step_times) // 2], 3),
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu_name(),
    }
    print(json.dumps(figures), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("compare")
    a.add_argument("--out", required=True)
    a.add_argument("--tenants", type=int, default=8)
    a.add_argument("--rows", type=int, default=64)
    a.add_argument("--batch_size", type=int, default=16)
    a.add_argument("--max_length", type=int, default=256)
    a.add_argument("--precision", default="fp32")
    a.add_argument("--json")
    b = sub.add_parser("scale")
    b.add_argument("--out", required=True)
    b.add_argument("--count", type=int, default=1000)
    b.add_argument("--rows", type=int, default=16)
    b.add_argument("--max_active", type=int, default=32)
    b.add_argument("--micro_batch_size", type=int, default=4)
    b.add_argument("--precision", default="fp32")
    b.add_argument("--json")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    {"compare": compare, "scale": scale}[args.command](args)


if __name__ == "__main__":
    main()
