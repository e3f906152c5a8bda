"""The sweep behind the `auto` hyperparameters (learning rate per configuration and rank, epochs and
batch size by rows) and the default `targets`: small fine-tunes of the real SmolLM2-135M on SQuAD
rows as own data, each scored by exact match and F1 on 50 held-out questions whose context
paragraphs no training row shares (greedy decoding, 16 new tokens).

    python benchmarks/hyperparameters.py --out /tmp/hp --results benchmarks/hyperparameters_cpu.jsonl \\
        --cells tl6:r8:lr1e-2 tl6:r8:lr1e-2:all lora:r8:lr3e-3 ...

A cell is `config:rK:lrX[:all|:qkv][:rowsN][:epochsE][:batchB]` (defaults: qkv, 64 rows, epochs and
batch size as the fine-tuning API's `auto` picks them). Each cell trains as a fine-tuning job does
(`tiedlora.finetuning`'s options: warm-up a tenth of the steps, validation each epoch, the best
epoch kept) and appends one line to --results; cells already there are skipped, so a killed sweep
goes on where it stopped. The base model's own scores are the cell `base`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from timing import cpu_name  # benchmarks/timing.py, beside this script

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "squad" / "validation.jsonl"
HELD_OUT = 50


def squad_line(row: dict) -> dict:
    """A SQuAD row as the fine-tuning benchmark uploads it: a shortened context, the question, the first answer."""
    return {
        "prompt": f"Context: {row['context'][:600]}\nQuestion: {row['question']}\nAnswer:",
        "completion": " " + row["answers"]["text"][0],
    }


def split(rows: list[dict], n_train: int) -> tuple[list[dict], list[dict]]:
    """The first `n_train` rows to train on; 50 rows from the end of the file whose contexts none of them shares."""
    train = rows[:n_train]
    seen = {r["context"] for r in train}
    held = [r for r in reversed(rows[n_train:]) if r["context"] not in seen][:HELD_OUT]
    return train, held


def parse(cell: str) -> dict:
    parts = cell.split(":")
    spec: dict = {"config": parts[0], "rank": 8, "lr": None, "targets": "qkv", "rows": 64}
    spec.update(epochs=None, batch=None)
    for p in parts[1:]:
        if p in ("all", "qkv", "attn"):
            spec["targets"] = p
        elif p.startswith("rows"):
            spec["rows"] = int(p[4:])
        elif p.startswith("epochs"):
            spec["epochs"] = int(p[6:])
        elif p.startswith("batch"):
            spec["batch"] = int(p[5:])
        elif p.startswith("lr"):
            spec["lr"] = float(p[2:])
        elif p.startswith("r"):
            spec["rank"] = int(p[1:])
        else:
            raise SystemExit(f"cell {cell!r}: cannot read {p!r}")
    return spec


TARGETS = {"qkv": ["qkv"], "attn": ["qkv", "o"], "all": ["qkv", "o", "mlp_in", "mlp_out"]}


def score(model, tokenizer, held: list[dict]) -> dict:
    from tiedlora.generation import generate_ids
    from tiedlora.tasks import metrics
    from tiedlora.tokens import prompt_ids

    ids = [prompt_ids(tokenizer, squad_line(r)["prompt"]) for r in held]
    predictions = generate_ids(model, tokenizer, ids, 16, 16, False)
    found = metrics.squad([p.strip().split("\n")[0] for p in predictions], [r["answers"]["text"] for r in held])
    return {"exact_match": round(found["exact_match"], 2), "f1": round(found["f1"], 2), "first": predictions[0]}


def run_cell(spec: dict, out: Path, rows: list[dict], precision: str) -> dict:
    from tiedlora.adapter_file import load
    from tiedlora.models import SMOLLM2, load_model
    from tiedlora.train import TrainConfig, train

    train_rows, held = split(rows, spec["rows"])
    folder = out / "data" / f"rows{spec['rows']}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(squad_line(r)) + "\n" for r in train_rows))
    if spec["config"] == "base":
        model, tokenizer = load_model(SMOLLM2)
        return score(model, tokenizer, held)
    from tiedlora.tasks.own import held_out
    from tiedlora.train.auto import job_options, steps_per_epoch

    kept = sum(1 for r in train_rows if not held_out(squad_line(r)))
    options = job_options(kept, spec["config"], spec["rank"], spec["epochs"], spec["batch"], spec["lr"])
    options.update(targets=TARGETS[spec["targets"]], precision=precision, samples=0, seed=0)
    name = "-".join(f"{k}{v}" for k, v in spec.items() if v is not None)
    cfg = TrainConfig(**options, data=str(folder / "train.jsonl"), out=str(out / "runs" / name))
    t0 = time.perf_counter()
    results = train(cfg, quiet=True)
    seconds = time.perf_counter() - t0
    model, tokenizer = load_model(SMOLLM2)
    load(model, Path(cfg.out) / "best")
    found = score(model, tokenizer, held)
    return {
        **found,
        "val_loss": results["metrics"].get("loss"),
        "steps": results["steps"],
        "best_step": results["best_step"],
        "lr": cfg.lr,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "train_rows": kept,
        "params": results["params"],
        "seconds": round(seconds, 1),
        "per_epoch": steps_per_epoch(kept, cfg.batch_size),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--results", required=True)
    p.add_argument("--precision", default="auto")
    p.add_argument("--cells", nargs="+", required=True)
    args = p.parse_args()
    out, results = Path(args.out), Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    done = {json.loads(line)["cell"] for line in results.read_text().splitlines()} if results.exists() else set()
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    for cell in args.cells:
        if cell in done:
            continue
        spec = parse(cell)
        t0 = time.perf_counter()
        found = run_cell(spec, out, rows, args.precision)
        line = {"cell": cell, **spec, **found, "wall_s": round(time.perf_counter() - t0, 1)}
        line.update(cpu=cpu_name(), precision=args.precision)
        print(json.dumps(line), flush=True)
        with results.open("a") as f:
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
