"""The `tiedlora` command: `COMMANDS`, a table of one short function per subcommand, each handing
its options to the module that owns the work. jsonargparse builds the flags from each function's
signature and its help from the docstring (train and sweep also take every TrainConfig field,
eval EvalConfig's and serve ServeConfig's, documented there), and YAML files can hold the same
options. Bad input ends in one line naming it, never a traceback."""

from __future__ import annotations

import dataclasses
import inspect
import json as jsonlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import TiedLoraError
from .models import SMOLLM2, parameter_table
from .runs import open_adapter


def params(model: str = "llama2-7b", rank: int = 8, json: bool = False) -> None:
    """Trainable parameters of every configuration (the paper's Table 1 formulas, counted on the model).

    Args:
        model: A preset (llama2-7b, gpt-2b-001, smollm2-135m), a local model folder or config.json, or a Hub id.
        rank: The rank r.
        json: Print a JSON list of {config, params, percent_of_lora}.
    """
    rows = parameter_table(model, rank)
    if json:
        print(jsonlib.dumps(rows, indent=2))
        return
    print(f"{model}, rank {rank}")
    print(f"{'config':<8} {'trainable':>12} {'% of LoRA':>10}")
    for row in rows:
        print(f"{row['config']:<8} {row['params']:>12,} {row['percent_of_lora']:>9.1f}%")


def train(
    resume: bool = False,
    quiet: bool = False,
    jobs: str | None = None,
    max_active: int | None = None,
    max_rows: int | None = None,
    **options,
) -> None:
    """Train an adapter, then score it on the test split. Options left unset come from the
    task's paper recipe (paper/configs/<task>.yaml), then from the defaults shown. With --jobs,
    many tenants' adapters train together on one base model loaded once.

    Args:
        resume: Continue the run in --out from its last checkpoint (with --jobs: every tenant's).
        quiet: No progress bar or validation lines.
        jobs: A JSON-lines file, one tenant per line: {"name": ..., "data": ..., any other option of a --data
            run}; each run goes to <out>/<name>, options given here are every job's defaults, and --out
            defaults to runs.
        max_active: With --jobs: at most this many tenants train at once (default: all).
        max_rows: With --jobs: at most this many rows (of any tenants) in one forward pass; more are split over
            several passes (default: the largest --micro_batch_size of the jobs, the memory of a solo run).
    """
    if jobs is not None:
        from .train.processes import main_process
        from .train.tenants import train_jobs_file

        summary = train_jobs_file(jobs, options, max_active=max_active, max_rows=max_rows, resume=resume, quiet=quiet)
        if main_process():
            print(jsonlib.dumps(summary, indent=2))
        failed = sum(t["status"] != "succeeded" for t in summary.values())
        if failed:
            raise TiedLoraError(f"{failed} of {len(summary)} jobs failed: see each one's error above.")
        return
    from .train import from_recipe
    from .train import train as run

    results = run(from_recipe(options), resume=resume, quiet=quiet)
    if results:
        keys = ("task", "config", "rank", "params", "metrics", "steps", "best_step", "stopped")
        print(jsonlib.dumps({k: results[k] for k in keys}, indent=2))


def sweep(
    *,
    out: str,
    tasks: str = "all",
    presets: str = "all",
    ranks: str = "2,8,32,128",
    lrs: str = "1e-4",
    layers: str = "",
    model: str = SMOLLM2,
    shard: str = "1/1",
    quiet: bool = False,
    **budget,
) -> None:
    """Run a grid of train runs, one folder per cell: finished cells are skipped, killed ones
    resumed. Budget options left unset come from each task's paper recipe.

    Args:
        out: The sweep folder.
        tasks: Comma-separated tasks, or all.
        presets: Comma-separated presets (configurations of the paper's Table 1), or all.
        ranks: Comma-separated ranks.
        lrs: Comma-separated learning rates (the report picks one per cell on validation), or config:lr
            pairs, e.g. lora:1e-3,tl6:1e-2 (table2 of `tiedlora report` gives those chosen).
        layers: Table 3: also LoRA on each of these single layers, e.g. 0,15,29.
        model: The base model of every cell.
        shard: k/n: run every n-th cell from the k-th (machines share --out).
        quiet: No line per cell.
    """
    from .config import PRESETS
    from .paper.sweep import CELL_FIELDS, grid, parse_lrs, parse_shard, run_sweep
    from .tasks import TASKS
    from .train import TrainConfig

    def split(text: str, allowed=(), cast=str) -> list:
        return list(allowed) if text == "all" else [cast(v) for v in text.split(",") if v.strip()]

    try:
        rank_list, layer_list = split(ranks, cast=int), split(layers, cast=int)
    except ValueError as e:
        raise TiedLoraError(f"--ranks and --layers take comma-separated numbers ({e}).") from None
    cells = grid(split(tasks, TASKS), split(presets, PRESETS), rank_list, parse_lrs(lrs), layer_list)
    budget = {f.name: budget.get(f.name) for f in dataclasses.fields(TrainConfig) if f.name not in CELL_FIELDS}
    run_sweep(cells, out, model=model, budget=budget, shard=parse_shard(shard), quiet=quiet)


def report(sweep: str, *, out: str, source: str | None = None, intervals: bool = True) -> None:
    """The paper's Table 2, Table 3, Figure 2 and Appendix A from a sweep's results, with
    bootstrap intervals over test rows.

    Args:
        sweep: The sweep folder.
        out: The folder for tables, plots and summary.
        source: Where the test rows are, if not where each run read them (the intervals rescore its predictions).
        intervals: Bootstrap 95 % intervals from each run's predictions.jsonl and test rows.
    """
    from .paper.report import report as write

    written = write(sweep, out, source, intervals)
    print(f"wrote {out}: table2, table3 (md, csv), {', '.join(Path(f).name for f in written['figures'])}, summary.md")


def evaluate(**options: Any) -> dict:
    """Score an adapter (or the base model) on a task by greedy decoding, or on your own data by
    loss, perplexity and, with --metric, generated answers."""
    from .evaluate import EvalConfig, evaluate_adapter  # EvalConfig's fields are this command's options

    result = evaluate_adapter(EvalConfig(**options))
    print(jsonlib.dumps(result, indent=2))
    return result


def merge(*, adapter: str, out: str, model: str | None = None) -> None:
    """Fold the adapter into the weights and write a standard transformers model folder.

    Args:
        adapter: A run folder or an adapter folder.
        out: The model folder to write.
        model: The base model (default: the run's).
    """
    from .model import remove

    lm, tokenizer, run = open_adapter(adapter, model, as_trained=False)
    remove(lm, merge_weights=True)
    lm.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"wrote {out}: a transformers model with the update folded in")
    if (run or {}).get("quantize"):
        print(
            f"The adapter was trained on a {run['quantize']} base (--quantize); it is merged into the "
            "unquantized base, "
            "whose weights can hold the update exactly."
        )


def export(*, adapter: str, out: str, format: str = "peft", model: str | None = None) -> None:
    """Export the adapter as a standard per-layer LoRA.

    Args:
        adapter: A run folder or an adapter folder.
        out: The folder to write.
        format: peft: PEFT's LoRA format, which vLLM and others load.
        model: The base model (default: the run's).
    """
    from .export import export_peft

    if format != "peft":
        raise TiedLoraError(f"--format {format!r}: the export format is peft (standard per-layer LoRA).")
    lm, _, _ = open_adapter(adapter, model)
    export_peft(lm, out)
    print(f"wrote {out}: a PEFT LoRA adapter (r = {lm.tiedlora.config.rank})")


def generate(
    prompt: str, *, adapter: str | None = None, model: str | None = None, max_new_tokens: int = 200, chat: bool = False
) -> None:
    """Greedy completion of one prompt, for a quick look.

    Args:
        prompt: The prompt.
        adapter: A run folder or an adapter folder (none: the base model).
        model: The base model (default: the run's, or smollm2-135m).
        max_new_tokens: Stop after this many tokens.
        chat: Use the chat template.
    """
    from .generation import generate as complete
    from .models import load_model

    lm, tokenizer = load_model(model or SMOLLM2) if adapter is None else open_adapter(adapter, model)[:2]
    print(complete(lm, tokenizer, [prompt], max_new_tokens, 1, chat)[0])


def serve(**options: Any) -> None:
    """An OpenAI-compatible HTTP server: one base model, every adapter under --adapters, requests
    batched across adapters at every step."""
    from .serve.config import ServeConfig  # its fields are this command's options, with their defaults and help
    from .serve.server import serve as run

    config = ServeConfig(**options)
    if config.state is not None or config.store is not None:
        from .service import build

        run(config, build)
    else:
        run(config)


COMMANDS: dict[str, Callable[..., Any]] = {
    "params": params,
    "train": train,
    "sweep": sweep,
    "report": report,
    "eval": evaluate,
    "merge": merge,
    "export": export,
    "generate": generate,
    "serve": serve,
}


def add_options(parser, source, skip=()) -> None:
    """Every parameter of `source` (a function, or a dataclass's fields) as a flag, typed and
    documented from its signature and docstrings; booleans as --x / --no_x switches (where
    jsonargparse's own would want --x true). Required parameters before the first `*` or
    keyword-only marker (`*`) are positional."""
    import docstring_parser
    from jsonargparse import ActionYesNo

    signature = inspect.signature(source)
    switches = {n for n, p in signature.parameters.items() if p.annotation in (bool, "bool") and n not in skip}
    docs = {p.arg_name: p.description for p in docstring_parser.parse_from_object(source).params}
    skipped = set(skip) | switches | {n for n, p in signature.parameters.items() if p.kind == p.VAR_KEYWORD}
    if dataclasses.is_dataclass(source):
        parser.add_class_arguments(source, skip=skipped, as_group=False)
    else:
        parser.add_function_arguments(source, skip=skipped, as_group=False, as_positional=True)
    for name in sorted(switches, key=list(signature.parameters).index):
        parser.add_argument(
            f"--{name}", action=ActionYesNo, default=signature.parameters[name].default, help=docs.get(name)
        )


def parser():
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    from .evaluate import EvalConfig
    from .paper.sweep import CELL_FIELDS
    from .serve.config import ServeConfig
    from .train import TrainConfig

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    top = ArgumentParser(
        prog="tiedlora", description="Tied-LoRA fine-tuning: weight-tied, selectively trained low-rank adapters."
    )
    commands = top.add_subcommands(dest="command")
    for name, command in COMMANDS.items():
        doc = inspect.getdoc(command) or ""
        p = ArgumentParser(prog=f"tiedlora {name}", description=doc.split("\n\nArgs:")[0])
        p.add_argument("--config", action=ActionConfigFile, help="A YAML file of these options.")
        add_options(p, command)
        if name == "train":
            add_options(p, TrainConfig)
        elif name == "sweep":
            add_options(p, TrainConfig, skip=CELL_FIELDS)
        elif name == "eval":
            add_options(p, EvalConfig)
        elif name == "serve":
            add_options(p, ServeConfig)
        commands.add_subcommand(name, p, help=doc.split("\n\n")[0].replace("\n", " "))
    return top


def main(argv: list[str] | None = None) -> int:
    """Parse and run one subcommand; 2 and one line on stderr for bad input. Only the options
    given are passed on (defaults=False), so unset ones take the function's defaults, or for
    train and sweep the task's paper recipe."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from .config import PRESETS

    named = [v for f, v in zip(argv, argv[1:]) if f == "--config"] + [a[9:] for a in argv if a.startswith("--config=")]
    if any(v in PRESETS for v in named):  # `--config tl6`, as train took the preset before it was --preset
        print(
            f"tiedlora: --config reads a YAML file of options; the configuration is --preset {named[0]}.",
            file=sys.stderr,
        )
        return 2
    try:
        args = parser().parse_args(argv, defaults=False)
    except ImportError as e:
        print(
            f"tiedlora: the command line needs the harness extra ({e.name} is missing): pip install "
            "'tiedlora[harness]'",
            file=sys.stderr,
        )
        return 2
    options = {k: v for k, v in args[args.command].as_dict().items() if k not in ("config", "__path__")}
    try:
        COMMANDS[args.command](**options)
    except TiedLoraError as e:
        print(f"tiedlora {args.command}: {e}", file=sys.stderr)
        return 2
    return 0


def run() -> None:
    """The console script's entry point: the exit status is main()'s."""
    sys.exit(main())
