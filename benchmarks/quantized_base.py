"""A quantized base against the full-precision one, on the real SmolLM2-135M: memory, step time
and the quality of a short SQuAD run with the same budget (`tiedlora train --quantize`).

Each variant (fp32, 8bit, 4bit) trains in its own process, so its peak memory is its own: the
demo's budget (tl6, r = 8, 40 steps of 8 bundled SQuAD rows, lr 1e-2), then greedy decoding of
the 27 held-out test rows. Reported per variant: the resident memory once the model is loaded,
quantized and adapted; the peak resident memory of the whole run (it includes loading the fp32
GGUF file before quantizing it); the decoder layers' weight bytes; the median step time from
log.csv; test exact match and F1.

    python benchmarks/quantized_base.py --out benchmarks/quantized_base_cpu.json
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
from demo import DEMO  # noqa: E402 - examples/demo.py: `make demo`'s budget

BUDGET = {**DEMO, "precision": "fp32"}  # fp32 for every variant, whatever the CPU


def child(variant: str, out: str) -> None:
    """One variant's run, in this process: prints its figures as one JSON line."""
    import psutil

    import tiedlora.train.loop as training
    from tiedlora.train import TrainConfig, train

    layers = {}
    real_apply = training.apply

    def measured_apply(model, config):  # right after loading and quantizing: what the run keeps resident
        layers["bytes"] = sum(p.numel() * p.element_size() for layer in model.model.layers for p in layer.parameters())
        layers["rss"] = psutil.Process().memory_info().rss
        return real_apply(model, config)

    training.apply = measured_apply
    quantize = None if variant == "fp32" else variant
    results = train(TrainConfig(**BUDGET, quantize=quantize, out=out), quiet=True)
    with open(Path(out) / "log.csv") as f:
        steps = [float(r["elapsed_s"]) for r in csv.DictReader(f)]
    step_s = statistics.median(b - a for a, b in zip([0.0, *steps], steps))
    print(
        json.dumps(
            {
                "variant": variant,
                "resident_bytes": layers["rss"],
                "layer_weight_bytes": layers["bytes"],
                "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "step_s": step_s,
                **results["metrics"],
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="fp32,8bit,4bit")
    p.add_argument("--out", default=None, help="Also write the rows to this JSON file.")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--run", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.run)
        return
    rows = []
    for variant in args.variants.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            done = subprocess.run(
                [sys.executable, __file__, "--child", variant, "--run", f"{tmp}/run"],
                capture_output=True,
                text=True,
                check=True,
            )
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    base = rows[0]
    print(
        f"\n{'variant':<8} {'resident MB':>11} {'x fp32':>7} {'peak MB':>8} {'layers MB':>9} {'step s':>7} "
        f"{'x fp32':>7} "
        f"{'EM':>6} {'F1':>6}"
    )
    for r in rows:
        print(
            f"{r['variant']:<8} {r['resident_bytes'] / 2**20:11.0f} "
            f"{r['resident_bytes'] / base['resident_bytes']:7.2f} "
            f"{r['peak_bytes'] / 2**20:8.0f} {r['layer_weight_bytes'] / 2**20:9.1f} {r['step_s']:7.2f} "
            f"{r['step_s'] / base['step_s']:7.2f} {r['exact_match']:6.1f} {r['f1']:6.1f}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
