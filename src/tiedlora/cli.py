"""The `tiedlora` command. Subcommands parse their flags (and YAML configs via --config) with
jsonargparse; bad input ends in one line naming it, never a traceback."""

from __future__ import annotations

import json
import sys

from . import PRESETS, TiedLoraConfig, TiedLoraError, apply, remove, trainable_parameters


def parameter_table(model_name: str, rank: int) -> list[dict]:
    """Trainable parameters of every preset on `model_name` at `rank`, and their share of LoRA's."""
    from .models import shape_model

    model = shape_model(model_name)
    counts = {}
    for name in PRESETS:
        apply(model, TiedLoraConfig.preset(name, rank=rank))
        counts[name] = trainable_parameters(model)
        remove(model)
    return [{"config": name, "params": n, "percent_of_lora": round(100 * n / counts["lora"], 4)} for name, n in counts.items()]


def params(model: str, rank: int, as_json: bool) -> None:
    rows = parameter_table(model, rank)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{model}, rank {rank}")
    print(f"{'config':<8} {'trainable':>12} {'% of LoRA':>10}")
    for row in rows:
        print(f"{row['config']:<8} {row['params']:>12,} {row['percent_of_lora']:>9.1f}%")


def parser():
    from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

    from .models import NAMES

    top = ArgumentParser(prog="tiedlora", description="Tied-LoRA fine-tuning: weight-tied, selectively trained low-rank adapters.")
    commands = top.add_subcommands(dest="command")

    p = ArgumentParser(description="Trainable parameters of every configuration (the paper's Table 1 formulas, counted on the model).")
    p.add_argument("--config", action=ActionConfigFile, help="A YAML file with these options.")
    p.add_argument("--model", default="llama2-7b", help=f"A preset ({', '.join(NAMES)}), a local model folder or config.json, or a Hub id.")
    p.add_argument("--rank", type=int, default=8, help="The rank r.")
    p.add_argument("--json", action=ActionYesNo, default=False, help="Print a JSON list of {config, params, percent_of_lora}.")
    commands.add_subcommand("params", p, help="Print trainable parameters per configuration.")
    return top


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except ImportError as e:
        print(f"tiedlora: the command line needs the harness extra ({e.name} is missing): pip install 'tiedlora[harness]'", file=sys.stderr)
        return 2
    sub = args[args.command]
    try:
        if args.command == "params":
            params(sub.model, sub.rank, sub.json)
    except TiedLoraError as e:
        print(f"tiedlora {args.command}: {e}", file=sys.stderr)
        return 2
    return 0


def run() -> None:
    """The console script's entry point: the exit status is main()'s."""
    sys.exit(main())
