"""The `tiedlora` command. Subcommands parse their flags (and YAML files) with jsonargparse;
bad input ends in one line naming it, never a traceback."""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from pathlib import Path

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


def open_adapter(adapter: str, model_name: str | None, base: bool = False):
    """(model, tokenizer, run config or None) for a run folder (its model and its best adapter)
    or an adapter folder; with `base`, the model without the adapter."""
    from .io import load
    from .models import load_model
    from .train import best_adapter

    run_file = Path(adapter) / "run.json"
    run = json.loads(run_file.read_text())["config"] if run_file.is_file() else None
    folder = best_adapter(Path(adapter))
    if not (folder / "adapter_config.json").is_file():
        raise TiedLoraError(f"--adapter {adapter}: no run folder (run.json) with a best/ adapter, nor an adapter folder (adapter_config.json).")
    model, tokenizer = load_model(model_name or (run or {}).get("model") or "smollm2-135m")
    if not base:
        load(model, folder)
    return model, tokenizer, run


def evaluate_command(adapter: str | None, task: str, split: str, limit: int | None, model: str | None, base: bool,
                     max_new_tokens: int, batch_size: int, loglik: bool, source: str, chat: bool) -> dict:
    from .evaluate import choice_loglik, evaluate
    from .models import load_model
    from .tasks import get

    if adapter is None and not base:
        raise TiedLoraError("eval needs --adapter runs/x (or an adapter folder), or --base to score the model alone.")
    if adapter is None:
        lm, tokenizer = load_model(model or "smollm2-135m")
        run = None
    else:
        lm, tokenizer, run = open_adapter(adapter, model, base)
    the_task = get(task)
    rows = the_task.load(split, source if source else (run or {}).get("source", "bundled"))
    picked = rows[:limit]
    scores = choice_loglik(lm, tokenizer, the_task, picked) if loglik else evaluate(lm, tokenizer, the_task, picked, max_new_tokens, batch_size, chat)
    scores.pop("predictions", None)
    return {"task": task, "split": split, "rows": len(picked), "adapter": None if base else adapter, "data": rows.info, "metrics": scores}


def merge_command(adapter: str, out: str, model: str | None) -> None:
    from .model import remove as remove_adapter

    lm, tokenizer, _ = open_adapter(adapter, model)
    remove_adapter(lm, merge_weights=True)
    lm.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"wrote {out}: a transformers model with the update folded in")


def export_command(adapter: str, out: str, format: str, model: str | None) -> None:
    from .io import export_peft

    if format != "peft":
        raise TiedLoraError(f"--format {format!r}: the export format is peft (standard per-layer LoRA).")
    lm, _, _ = open_adapter(adapter, model)
    export_peft(lm, out)
    print(f"wrote {out}: a PEFT LoRA adapter (r = {lm.tiedlora.config.rank})")


def generate_command(adapter: str | None, prompt: str, model: str | None, max_new_tokens: int, chat: bool) -> str:
    from .evaluate import generate
    from .models import load_model

    lm, tokenizer = load_model(model or "smollm2-135m") if adapter is None else open_adapter(adapter, model)[:2]
    return generate(lm, tokenizer, [prompt], max_new_tokens, 1, chat)[0]


def _train_parser():
    """`tiedlora train`: every TrainConfig field is a flag; --recipe reads them from YAML; the
    task's paper recipe (configs/paper/<task>.yaml) gives the defaults."""
    from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

    p = ArgumentParser(description="Train a Tied-LoRA adapter with the paper's recipe (its values are the defaults), then score it on the test split.")
    p.add_argument("--recipe", action=ActionConfigFile, help="A YAML file of these options (configs/paper/<task>.yaml is the default).")
    _add_train_options(p)
    p.add_argument("--resume", action=ActionYesNo, default=False, help="Continue the run in --out from its last checkpoint.")
    p.add_argument("--quiet", action=ActionYesNo, default=False, help="No progress bar or validation lines.")
    return p


HELP = {
    "task": "squad, dialogsum, hellaswag, iwslt2017-de-en or gsm8k.",
    "config": f"The configuration: {', '.join(PRESETS)}.",
    "rank": "The rank r.",
    "alpha": "Scale numerator (default: rank, i.e. scale 1 as in the paper).",
    "layers": "Adapt only these layer indices, e.g. [3].",
    "init": 'Override a part\'s init, e.g. {"A": "zeros"} (tl1\'s zero-start variant).',
    "dropout": "Dropout on the adapter's input (0: none, no copy).",
    "model": "smollm2-135m (bundled), a local model folder, or a Hub id.",
    "out": "The run folder.",
    "source": "Data: bundled, hub, a folder of <split>.jsonl, or a root with one folder per task.",
    "lr": "Peak learning rate (the paper tried 1e-4 and 1e-5; tied configurations often want more).",
    "weight_decay": "AdamW weight decay.",
    "warmup_steps": "Linear warm-up steps before the cosine decay.",
    "max_steps": "At most this many optimizer steps.",
    "batch_size": "Global batch (examples per optimizer step), reached by accumulation and data parallelism.",
    "micro_batch_size": "Examples per forward pass on one device.",
    "val_every": "Validate every this many steps.",
    "val_rows": "Validation rows used (all if null).",
    "patience": "Stop after this many validations without improvement.",
    "early_stop_on": "loss (validation loss, cheap) or metric (the task's headline, by generation).",
    "fsdp": "With several processes, shard the frozen base model's layers over them (torch FSDP2); the adapter stays whole.",
    "precision": "Training matmuls: auto (bf16 autocast on a GPU, fp32 on a CPU), bf16 (about 2x faster on CPUs with AVX512-BF16 or AMX) or fp32. The adapter and optimizer stay fp32.",
    "val_metric": "Also score the task's headline metric (by generation) at every validation.",
    "checkpoint_every": "Checkpoint every this many steps (default: val_every).",
    "max_length": "Longest training example in tokens; longer prompts lose their start.",
    "train_rows": "Use only the first N training rows (all if null).",
    "test_rows": "Score only the first N test rows (all if null).",
    "max_new_tokens": "Greedy decoding stops at EOS or after this many tokens.",
    "eval_batch_size": "Prompts per generation batch.",
    "chat": "Wrap prompts in the tokenizer's chat template.",
    "seed": "Seeds the adapter's init, the data order and dropout.",
}


def _sweep_parser():
    """`tiedlora sweep`: the grid, plus every budget option of train (unset: the task's paper recipe)."""
    from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

    from .sweep import CELL_FIELDS

    p = ArgumentParser(description="Run a grid of train runs (skips finished cells, resumes killed ones), one folder per cell.")
    p.add_argument("--recipe", action=ActionConfigFile, help="A YAML file of these options.")
    p.add_argument("--tasks", default="all", help="Comma-separated tasks, or all.")
    p.add_argument("--configs", default="all", help=f"Comma-separated configurations, or all ({', '.join(PRESETS)}).")
    p.add_argument("--ranks", default="2,8,32,128", help="Comma-separated ranks.")
    p.add_argument("--lrs", default="1e-4", help="Comma-separated learning rates (the report picks one per cell on validation), "
                   "or config:lr pairs, e.g. lora:1e-3,tl6:1e-2 (table2 of `tiedlora report` gives those chosen).")
    p.add_argument("--layers", default="", help="Table 3: also LoRA on each of these single layers, e.g. 0,15,29.")
    p.add_argument("--model", default="smollm2-135m", help="The base model of every cell.")
    p.add_argument("--out", required=True, help="The sweep folder.")
    p.add_argument("--shard", default="1/1", help="k/n: run every n-th cell from the k-th (machines share --out).")
    p.add_argument("--quiet", action=ActionYesNo, default=False, help="No line per cell.")
    _add_train_options(p, skip=CELL_FIELDS, unset_is_recipe=True)
    return p


def _add_train_options(p, skip=(), unset_is_recipe: bool = False) -> None:
    """A flag per TrainConfig field. For a sweep every one defaults to unset (None), meaning
    the task's paper recipe, so booleans stay three-valued rather than yes/no switches."""
    from jsonargparse import ActionYesNo

    from .train import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        kind, help_text = hints[f.name], HELP.get(f.name, "")
        if unset_is_recipe:
            p.add_argument(f"--{f.name}", type=kind if kind is bool else typing.Optional[kind], default=None,
                           help=help_text + " (unset: the task's paper recipe)")
        elif kind is bool:
            p.add_argument(f"--{f.name}", action=ActionYesNo, default=f.default, help=help_text)
        else:
            p.add_argument(f"--{f.name}", type=kind, default=f.default, help=help_text)


def _split(text: str, allowed, cast=str) -> list:
    """A comma-separated flag as a list; "all" is every allowed value."""
    return list(allowed) if text == "all" else [cast(v) for v in text.split(",") if v.strip()]


def sweep_command(sub) -> None:
    from .sweep import CELL_FIELDS, grid, parse_lrs, parse_shard, run_sweep
    from .tasks import TASKS
    from .train import TrainConfig

    try:
        ranks, layers = _split(sub.ranks, (), int), _split(sub.layers, (), int)
    except ValueError as e:
        raise TiedLoraError(f"--ranks and --layers take comma-separated numbers ({e}).") from None
    lrs = parse_lrs(sub.lrs)
    tasks, configs = _split(sub.tasks, TASKS), _split(sub.configs, PRESETS)
    budget = {f.name: sub[f.name] for f in dataclasses.fields(TrainConfig) if f.name not in CELL_FIELDS}
    run_sweep(grid(tasks, configs, ranks, lrs, layers), sub.out, model=sub.model, budget=budget,
              shard=parse_shard(sub.shard), quiet=sub.quiet)


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

    commands.add_subcommand("train", _train_parser(), help="Train an adapter (the paper's recipe) and score it.")

    commands.add_subcommand("sweep", _sweep_parser(), help="Run a rank sweep over tasks and configurations.")

    r = ArgumentParser(description="The paper's Table 2, Table 3, Figure 2 and Appendix A from a sweep's results.")
    r.add_argument("sweep", help="The sweep folder.")
    r.add_argument("--out", required=True, help="The folder for tables, plots and summary.")
    commands.add_subcommand("report", r, help="Tables and figures from a sweep.")

    e = ArgumentParser(description="Score an adapter (or the base model) on a task by greedy decoding.")
    e.add_argument("--adapter", help="A run folder (runs/x) or an adapter folder.")
    e.add_argument("--task", required=True, help="The task.")
    e.add_argument("--split", default="test", help="train, validation or test.")
    e.add_argument("--limit", type=typing.Optional[int], default=None, help="Score only the first N rows.")
    e.add_argument("--model", help="The base model (default: the run's, or smollm2-135m).")
    e.add_argument("--base", action=ActionYesNo, default=False, help="Score the base model without the adapter.")
    e.add_argument("--max_new_tokens", type=int, default=500, help="Greedy decoding stops at EOS or after this many tokens.")
    e.add_argument("--batch_size", type=int, default=16, help="Prompts per generation batch.")
    e.add_argument("--loglik", action=ActionYesNo, default=False, help="HellaSwag: score choices by log-likelihood instead.")
    e.add_argument("--source", default=None, help="Data source (default: the run's, or bundled).")
    e.add_argument("--chat", action=ActionYesNo, default=False, help="Use the chat template.")
    e.add_argument("--out", default=None, help="Also write the scores to this JSON file.")
    commands.add_subcommand("eval", e, help="Score an adapter or the base model.")

    m = ArgumentParser(description="Fold the adapter into the weights and write a standard transformers model folder.")
    m.add_argument("--adapter", required=True, help="A run folder or an adapter folder.")
    m.add_argument("--out", required=True, help="The model folder to write.")
    m.add_argument("--model", help="The base model (default: the run's).")
    commands.add_subcommand("merge", m, help="Write a merged model.")

    x = ArgumentParser(description="Export the adapter as a standard per-layer LoRA.")
    x.add_argument("--adapter", required=True, help="A run folder or an adapter folder.")
    x.add_argument("--out", required=True, help="The folder to write.")
    x.add_argument("--format", default="peft", help="peft: PEFT's LoRA format, which vLLM and others load.")
    x.add_argument("--model", help="The base model (default: the run's).")
    commands.add_subcommand("export", x, help="Export to PEFT LoRA.")

    g = ArgumentParser(description="Greedy completion of one prompt, for a quick look.")
    g.add_argument("prompt", help="The prompt.")
    g.add_argument("--adapter", help="A run folder or an adapter folder (none: the base model).")
    g.add_argument("--model", help="The base model (default: the run's, or smollm2-135m).")
    g.add_argument("--max_new_tokens", type=int, default=200, help="Stop after this many tokens.")
    g.add_argument("--chat", action=ActionYesNo, default=False, help="Use the chat template.")
    commands.add_subcommand("generate", g, help="Complete one prompt.")

    s = ArgumentParser(description="An OpenAI-compatible HTTP server: one base model, every adapter under --adapters, requests batched across adapters.")
    s.add_argument("--model", default="smollm2-135m", help="The base model; requests name it to use no adapter.")
    s.add_argument("--adapters", default="runs", help="Serve every run folder (its best/) and adapter folder under it, named by relative path.")
    s.add_argument("--host", default="127.0.0.1", help="The address to listen on.")
    s.add_argument("--port", type=int, default=8000, help="The port.")
    s.add_argument("--max_batch", type=int, default=32, help="At most this many requests decoded together.")
    s.add_argument("--max_prompt_tokens", type=int, default=2048, help="Longer prompts are refused.")
    s.add_argument("--max_tokens_limit", type=int, default=1024, help="The largest max_tokens a request may ask for.")
    commands.add_subcommand("serve", s, help="Serve adapters over HTTP (OpenAI API).")
    return top


def _with_paper_recipe(argv: list[str]) -> list[str]:
    """`train` starts from configs/paper/<task>.yaml: it goes first, so flags override it."""
    if not argv or argv[0] != "train":
        return argv
    task = next((a.split("=", 1)[1] for a in argv if a.startswith("--task=")), None)
    task = task or next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--task"), None)
    from .train import RECIPES

    recipe = RECIPES / f"{task}.yaml"
    return ["train", "--recipe", str(recipe), *argv[1:]] if recipe.is_file() else argv


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser().parse_args(_with_paper_recipe(argv))
    except ImportError as e:
        print(f"tiedlora: the command line needs the harness extra ({e.name} is missing): pip install 'tiedlora[harness]'", file=sys.stderr)
        return 2
    sub = args[args.command]
    try:
        if args.command == "params":
            params(sub.model, sub.rank, sub.json)
        elif args.command == "train":
            from .train import TrainConfig, train

            options = {f.name: sub[f.name] for f in dataclasses.fields(TrainConfig)}
            results = train(TrainConfig(**options), resume=sub.resume, quiet=sub.quiet)
            if results:
                print(json.dumps({k: results[k] for k in ("task", "config", "rank", "params", "metrics", "steps", "best_step", "stopped")}, indent=2))
        elif args.command == "sweep":
            sweep_command(sub)
        elif args.command == "report":
            from .report import report

            written = report(sub.sweep, sub.out)
            print(f"wrote {sub.out}: table2, table3 (md, csv), {', '.join(Path(f).name for f in written['figures'])}, summary.md")
        elif args.command == "eval":
            scores = evaluate_command(sub.adapter, sub.task, sub.split, sub.limit, sub.model, sub.base, sub.max_new_tokens,
                                      sub.batch_size, sub.loglik, sub.source, sub.chat)
            text = json.dumps(scores, indent=2)
            if sub.out:
                from .io import write_atomic

                write_atomic(Path(sub.out), (text + "\n").encode())
            print(text)
        elif args.command == "merge":
            merge_command(sub.adapter, sub.out, sub.model)
        elif args.command == "export":
            export_command(sub.adapter, sub.out, sub.format, sub.model)
        elif args.command == "generate":
            print(generate_command(sub.adapter, sub.prompt, sub.model, sub.max_new_tokens, sub.chat))
        elif args.command == "serve":
            from .serve import serve

            serve(sub.model, sub.adapters, sub.host, sub.port, sub.max_batch, sub.max_prompt_tokens, sub.max_tokens_limit)
    except TiedLoraError as e:
        print(f"tiedlora {args.command}: {e}", file=sys.stderr)
        return 2
    return 0


def run() -> None:
    """The console script's entry point: the exit status is main()'s."""
    sys.exit(main())
