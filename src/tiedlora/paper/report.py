"""The paper's tables and figures from a sweep's results.json files (and, for the intervals, the
predictions beside them).

Every choice uses validation data: per (task, configuration, rank) the learning rate with the
best validation value, per task the LoRA rank with the best validation value, per configuration
its best rank likewise. The numbers reported are test metrics (each task's headline). The tables
hold the first seed's runs; cells trained at more seeds get their mean and spread beside them.
"""

from __future__ import annotations

import csv
import io
import statistics
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from ..atomic import write_atomic
from ..config import PRESETS, TiedLoraError
from ..runs import PREDICTIONS, load_runs, read_predictions
from .intervals import Headlines, difference, headlines, interval, mean_of

# The paper's LLaMA-2 7B finding, for the summary: tl6 1.36 % below LoRA on average with 12.5 % of its parameters.
PAPER = "The paper (LLaMA-2 7B): tl6 is 1.36 % below LoRA on average, with 12.5 % of LoRA's parameters or fewer."


def _better(a: dict, b: dict) -> bool:
    """Is run a better than run b on validation (lower loss, or higher metric)?"""
    va, vb = a["validation"], b["validation"]
    return va["best"] < vb["best"] if va["on"] == "loss" else va["best"] > vb["best"]


def best(runs: dict):
    """The key (a rank) of the run with the best validation value; ties go to the smaller key."""
    top = None
    for key in sorted(runs):
        if top is None or _better(runs[key], runs[top]):
            top = key
    return top


def seed_of(run: dict) -> int:
    return run["recipe"].get("seed") or 0


def first_seed(results: list[dict]) -> int:
    """The seed whose runs the tables hold."""
    return min((seed_of(r) for r in results), default=0)


def select(results: list[dict]) -> dict:
    """{(task, config, rank, layer): the run with the best validation over learning rates}, among
    the runs of the first seed; `seed_spread` reports the other seeds."""
    chosen: dict[tuple, dict] = {}
    first = first_seed(results)
    for r in results:
        if "diverged" in r or seed_of(r) != first:  # a diverged run's learning rate lost; another one's stands
            continue
        layers = r["recipe"].get("layers")
        key = (r["task"], r["config"], r["rank"], layers[0] if layers else None)
        if key not in chosen or _better(r, chosen[key]):
            chosen[key] = r
    return chosen


def headline(run: dict) -> float:
    return next(iter(run["metrics"].values()))


Samples = Callable[[dict], "Headlines | None"]


def no_samples(run: dict) -> Headlines | None:
    return None


def spread(values) -> tuple[float | None, float | None]:
    return (None, None) if values is None else interval(values)


def table2(chosen: dict, samples: Samples = no_samples) -> tuple[list[dict], list[str]]:
    """Rows per task and configuration: at LoRA's best rank, and at the configuration's own best
    rank, each with its bootstrap interval over test rows, and the gap to LoRA at LoRA's rank with
    its paired bootstrap interval (where `samples` has the run's resampled headlines). Each row
    also keeps the resampled gap ("gap_samples") for the averages over tasks."""
    tasks = sorted({k[0] for k in chosen})
    configs = [c for c in PRESETS if any(k[1] == c and k[3] is None for k in chosen)]
    rows = []
    for task in tasks:
        lora = {k[2]: run for k, run in chosen.items() if k[0] == task and k[1] == "lora" and k[3] is None}
        if not lora:
            continue
        star = best(lora)
        base = lora[star]["params"]
        for config in configs:
            runs = {k[2]: run for k, run in chosen.items() if k[0] == task and k[1] == config and k[3] is None}
            if not runs:
                continue
            top = best(runs)
            at_star = runs.get(star)
            ours, top_ours = samples(at_star) if at_star else None, samples(runs[top])
            gap = difference(ours, samples(lora[star]))
            rows.append(
                {
                    "task": task,
                    "config": config,
                    "lora_rank": star,
                    "metric_at_lora_rank": headline(at_star) if at_star else None,
                    "P%_at_lora_rank": 100 * at_star["params"] / base if at_star else None,
                    "lr_at_lora_rank": at_star["recipe"]["lr"] if at_star else None,
                    "best_rank": top,
                    "metric_at_best_rank": headline(runs[top]),
                    "P%_at_best_rank": 100 * runs[top]["params"] / base,
                    "lr_at_best_rank": runs[top]["recipe"]["lr"],
                    "gap_to_lora": headline(at_star) - headline(lora[star]) if at_star else None,
                    "gap_samples": gap,
                    "samples_at_lora_rank": None if ours is None else ours.values,
                    "samples_at_best_rank": None if top_ours is None else top_ours.values,
                }
            )
    averages = []
    for config in configs:
        mine = [r for r in rows if r["config"] == config]
        if mine and len(mine) == len(tasks):
            averages.append(
                {
                    "task": "average",
                    "config": config,
                    "lora_rank": None,
                    "metric_at_lora_rank": _mean(r["metric_at_lora_rank"] for r in mine),
                    "P%_at_lora_rank": _mean(r["P%_at_lora_rank"] for r in mine),
                    "lr_at_lora_rank": None,
                    "best_rank": None,
                    "metric_at_best_rank": _mean(r["metric_at_best_rank"] for r in mine),
                    "P%_at_best_rank": _mean(r["P%_at_best_rank"] for r in mine),
                    "lr_at_best_rank": None,
                    "gap_to_lora": _mean(r["gap_to_lora"] for r in mine),
                    "gap_samples": mean_of([r["gap_samples"] for r in mine]),
                    "samples_at_lora_rank": mean_of([r["samples_at_lora_rank"] for r in mine]),
                    "samples_at_best_rank": mean_of([r["samples_at_best_rank"] for r in mine]),
                }
            )
    for row in rows + averages:
        row["ci_low"], row["ci_high"] = spread(row["samples_at_lora_rank"])
        row["ci_low_at_best_rank"], row["ci_high_at_best_rank"] = spread(row["samples_at_best_rank"])
        row["gap_ci_low"], row["gap_ci_high"] = spread(row["gap_samples"])
    return rows + averages, tasks


def _mean(values):
    values = list(values)
    return None if not values or any(v is None for v in values) else sum(values) / len(values)


def table3(chosen: dict) -> list[dict]:
    """LoRA on one layer against tl5 (the same parameter count) at each rank, per task."""
    rows = []
    for (task, config, rank, layer), run in sorted(
        chosen.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][3] is None, kv[0][3] or 0)
    ):
        if (config == "lora" and layer is not None) or (
            config == "tl5"
            and layer is None
            and any(k[0] == task and k[2] == rank and k[3] is not None for k in chosen)
        ):
            rows.append(
                {
                    "task": task,
                    "rank": rank,
                    "adapter": f"lora, layer {layer}" if layer is not None else "tl5, all layers",
                    "params": run["params"],
                    "metric": headline(run),
                }
            )
    return rows


def seed_spread(results: list[dict]) -> list[dict]:
    """Per (task, configuration, rank) trained at more than one seed: each seed's test metric (its
    run chosen on validation as `select` chooses), their mean and sample standard deviation."""
    per_seed: dict[tuple, dict[int, float]] = defaultdict(dict)
    for seed in sorted({seed_of(r) for r in results}):
        for (task, config, rank, layer), run in select([r for r in results if seed_of(r) == seed]).items():
            if layer is None:
                per_seed[(task, config, rank)][seed] = headline(run)
    rows = []
    for (task, config, rank), values in sorted(
        per_seed.items(), key=lambda kv: (kv[0][0], list(PRESETS).index(kv[0][1]), kv[0][2])
    ):
        if len(values) > 1:
            rows.append(
                {
                    "task": task,
                    "config": config,
                    "rank": rank,
                    "seeds": len(values),
                    "mean": statistics.mean(values.values()),
                    "std": statistics.stdev(values.values()),
                    "min": min(values.values()),
                    "max": max(values.values()),
                    "by_seed": " ".join(f"{seed}: {v:.2f}" for seed, v in sorted(values.items())),
                }
            )
    return rows


def gaps(rows: list[dict]) -> dict:
    """Average over tasks of each configuration's gap to LoRA at LoRA's best rank: points, and
    percent of LoRA's average over the same tasks."""
    out = {}
    per_task = [r for r in rows if r["task"] != "average"]
    lora = {r["task"]: r["metric_at_lora_rank"] for r in per_task if r["config"] == "lora"}
    for config in dict.fromkeys(r["config"] for r in per_task):
        # only tasks where the configuration ran at LoRA's best rank; its P% over those same tasks
        ran = [
            r for r in per_task if r["config"] == config and r["metric_at_lora_rank"] is not None and r["task"] in lora
        ]
        pairs = [(r["metric_at_lora_rank"], lora[r["task"]]) for r in ran]
        if pairs:
            low, high = spread(mean_of([r.get("gap_samples") for r in ran]))
            out[config] = {
                "points": sum(m - ref for m, ref in pairs) / len(pairs),
                # the gap of the task average relative to LoRA's: a task near 0 (GSM8K on a small model)
                # cannot blow it up
                "relative_%": 100 * sum(m - ref for m, ref in pairs) / sum(ref for _, ref in pairs)
                if any(ref for _, ref in pairs)
                else 0.0,
                "P%": _mean(r["P%_at_lora_rank"] for r in ran),
                "tasks": len(pairs),
                "ci_low": low,
                "ci_high": high,
            }
    return out


def markdown(rows: list[dict], columns: list[str]) -> str:
    def cell(v):
        return (
            ""
            if v is None
            else f"{v:g}"
            if isinstance(v, float) and 0 < abs(v) < 0.01
            else f"{v:.2f}"
            if isinstance(v, float)
            else str(v)
        )

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns)
    writer.writeheader()
    writer.writerows({c: r[c] for c in columns} for r in rows)
    return buffer.getvalue()


def plots(chosen: dict, out: Path) -> list[Path]:
    """Figure 2 (metric vs rank averaged over tasks: all configurations; the best tied ones
    against LoRA and VeRA) and Appendix A (one panel per task)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)  # (task, config) -> {rank: metric}
    for (task, config, rank, layer), run in chosen.items():
        if layer is None:
            curves[(task, config)][rank] = headline(run)
    tasks = sorted({t for t, _ in curves})
    configs = [c for c in PRESETS if any(k[1] == c for k in curves)]
    average = {}
    for config in configs:
        ranks = sorted(set.intersection(*(set(curves.get((t, config), {})) for t in tasks)))
        if ranks:
            average[config] = {r: sum(curves[(t, config)][r] for t in tasks) / len(tasks) for r in ranks}

    def draw(ax, series, title):
        for config, points in series.items():
            ranks = sorted(points)
            ax.plot(
                ranks,
                [points[r] for r in ranks],
                marker="o",
                label=config,
                color=f"C{list(PRESETS).index(config)}",
                linestyle="--" if config in ("lora", "vera") else "-",
            )
        ax.set_xscale("log", base=2)
        ticks = sorted({r for points in series.values() for r in points})
        ax.set_xticks(ticks, [str(r) for r in ticks])
        ax.minorticks_off()
        ax.set_xlabel("rank r")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)

    paths = []
    if average:
        tied = sorted(
            (c for c in average if c not in ("lora", "vera")), key=lambda c: -sum(average[c].values()) / len(average[c])
        )[:2]
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
        draw(a, average, f"All configurations, average over {len(tasks)} tasks")
        draw(
            b,
            {c: average[c] for c in ("lora", "vera", *tied) if c in average},
            "Best tied configurations vs LoRA and VeRA",
        )
        a.set_ylabel("test metric (task headline, 0-100)")
        fig.tight_layout()
        paths.append(out / "figure2.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    if tasks:
        fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.8), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            draw(ax, {c: curves[(task, c)] for c in configs if (task, c) in curves}, task)
        axes[0][0].set_ylabel("test metric (task headline, 0-100)")
        fig.tight_layout()
        paths.append(out / "appendix_a.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def bars(rows: list[dict], out: Path) -> Path | None:
    """Table 2 as a picture: per task, every configuration's test metric at LoRA's best rank,
    labelled with its share of LoRA's parameters; readable when a sweep has few ranks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [r for r in rows if r["task"] != "average" and r["metric_at_lora_rank"] is not None]
    if not cells:
        return None
    tasks = list(dict.fromkeys(r["task"] for r in cells))
    configs = [c for c in PRESETS if any(r["config"] == c for r in cells)]
    width = 0.8 / len(configs)
    fig, ax = plt.subplots(figsize=(1.9 * len(tasks) + 3, 4.2))
    for j, config in enumerate(configs):
        mine = {r["task"]: r for r in cells if r["config"] == config}
        xs = [i + (j - (len(configs) - 1) / 2) * width for i, t in enumerate(tasks) if t in mine]
        share = _mean(r["P%_at_lora_rank"] for r in mine.values())
        ax.bar(
            xs,
            [mine[t]["metric_at_lora_rank"] for t in tasks if t in mine],
            width,
            color=f"C{list(PRESETS).index(config)}",
            label=f"{config} ({share:.1f} % of LoRA)",
        )
    ax.set_xticks(
        range(len(tasks)), [f"{t}\n(r = {next(r['lora_rank'] for r in cells if r['task'] == t)})" for t in tasks]
    )
    ax.set_ylabel("test metric (task headline, 0-100)")
    ax.set_title("Every configuration at LoRA's best rank per task (chosen on validation)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    path = out / "table2.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


T2 = [
    "task",
    "config",
    "lora_rank",
    "metric_at_lora_rank",
    "ci_low",
    "ci_high",
    "P%_at_lora_rank",
    "lr_at_lora_rank",
    "best_rank",
    "metric_at_best_rank",
    "ci_low_at_best_rank",
    "ci_high_at_best_rank",
    "P%_at_best_rank",
    "lr_at_best_rank",
    "gap_to_lora",
    "gap_ci_low",
    "gap_ci_high",
]
T3 = ["task", "rank", "adapter", "params", "metric"]
SEEDS = ["task", "config", "rank", "seeds", "mean", "std", "min", "max", "by_seed"]


class Resampler:
    """Each run's headline on the bootstrap resamples of its test rows, from its
    predictions.jsonl and the rows it was tested on, read again from its data source (or
    `source`). None for a run without predictions (one written by hand, or on own data)."""

    def __init__(self, folders: dict[int, Path], source: str | None):
        self.folders, self.source = folders, source
        self.tests: dict[tuple[str, str], list] = {}
        self.done: dict[int, Headlines | None] = {}

    def __call__(self, run: dict) -> Headlines | None:
        if id(run) not in self.done:
            self.done[id(run)] = self.resample(run)
        return self.done[id(run)]

    def resample(self, run: dict) -> Headlines | None:
        from ..tasks import TASKS

        path = self.folders[id(run)] / PREDICTIONS
        if not path.is_file() or run["task"] not in TASKS:
            return None
        task = TASKS[run["task"]]
        try:
            predictions = read_predictions(path.parent)
            rows = run["data"]["test_rows_used"]
            source = self.source or run["data"]["test"]["source"]
        except (ValueError, KeyError, TypeError) as e:
            raise TiedLoraError(
                f"{path} or its results.json is damaged ({e!r}): run the cell again, or report with --no_intervals."
            ) from None
        if (task.name, source) not in self.tests:
            try:
                self.tests[(task.name, source)] = task.load("test", source)
            except TiedLoraError as e:
                raise TiedLoraError(
                    f"{path.parent}: its test rows cannot be read ({e}); pass --source with the data the sweep "
                    "ran on, or report with --no_intervals."
                ) from None
        test = self.tests[(task.name, source)][:rows]
        statistics = task.row_statistics(predictions, test) if len(predictions) == rows == len(test) else None
        if (
            statistics is None
            or abs(task.of_statistics([sum(c) for c in zip(*statistics)], rows) - headline(run)) > 1e-6
        ):
            raise TiedLoraError(
                f"{path}: its {len(predictions)} predictions do not give the {headline(run):.4f} its results.json "
                f"records on the first {rows} test rows of {source}: pass --source with the data the sweep ran on."
            )
        return headlines(task, statistics)


def report(sweep, out, source: str | None = None, intervals: bool = True) -> dict:
    """Write table2.{md,csv,png}, table3.{md,csv}, figure2.png, appendix_a.png and summary.md;
    with `intervals`, bootstrap intervals over test rows (`source`: where the test rows are, if
    not where each run read them)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    found = load_runs(sweep)
    results = [run for _, run in found]
    chosen = select(results)
    samples = Resampler({id(run): folder for folder, run in found}, source) if intervals else no_samples
    rows2, tasks = table2(chosen, samples)
    rows3 = table3(chosen)
    gap = gaps(rows2)
    write_atomic(out / "table2.md", markdown(rows2, T2).encode())
    write_atomic(out / "table2.csv", to_csv(rows2, T2).encode())
    write_atomic(out / "table3.md", markdown(rows3, T3).encode())
    write_atomic(out / "table3.csv", to_csv(rows3, T3).encode())
    spread_rows = seed_spread(results)
    if spread_rows:
        write_atomic(out / "seeds.md", markdown(spread_rows, SEEDS).encode())
        write_atomic(out / "seeds.csv", to_csv(spread_rows, SEEDS).encode())
    figures = [p for p in (bars(rows2, out),) if p] + plots(chosen, out)
    diverged = [r["recipe"]["out"] for r in results if "diverged" in r]
    write_atomic(out / "summary.md", summary(results, tasks, diverged, rows2, gap, spread_rows).encode())
    return {"table2": rows2, "table3": rows3, "seeds": spread_rows, "gaps": gap, "figures": [str(p) for p in figures]}


def summary(
    results: list[dict], tasks: list[str], diverged: list[str], rows: list[dict], gap: dict, seeds: list[dict]
) -> str:
    lines = [
        f"# Summary of {len(results)} runs over {len(tasks)} tasks",
        "",
        f"{len(diverged)} runs diverged (their learning rate was too high; the cell's other learning rates stand): "
        f"{', '.join(Path(d).name for d in diverged) or 'none'}.",
        "",
        "Average gap to LoRA at LoRA's best rank (per task, chosen on validation), test metric, with its paired "
        "bootstrap 95 % interval over test rows where the runs' predictions were there:",
        "",
    ]
    for config, g in gap.items():
        within = "" if g["ci_low"] is None else f", 95 % interval [{g['ci_low']:+.2f}, {g['ci_high']:+.2f}]"
        lines.append(
            f"- {config}: {g['points']:+.2f} points{within} ({g['relative_%']:+.2f} % relative) with {g['P%']:.1f} % "
            f"of LoRA's parameters, over {g['tasks']} tasks"
        )
    paired = [r for r in rows if r["config"] != "lora" and r["task"] != "average" and r["gap_ci_low"] is not None]
    if paired:
        clear = [r for r in paired if r["gap_ci_low"] > 0 or r["gap_ci_high"] < 0]
        lines += [
            "",
            "Per task, the difference to LoRA at LoRA's best rank and its paired bootstrap 95 % interval "
            "(2,000 resamples of the test rows; **bold** where the interval excludes zero):",
            "",
            "| task | config | difference | 95 % interval |",
            "|---|---|---|---|",
        ]
        for r in paired:
            mark = "**" if r in clear else ""
            lines.append(
                f"| {r['task']} | {r['config']} | {mark}{r['gap_to_lora']:+.2f}{mark} | "
                f"[{r['gap_ci_low']:+.2f}, {r['gap_ci_high']:+.2f}] |"
            )
        lines += [
            "",
            f"{len(clear)} of these {len(paired)} differences exclude zero: "
            + (", ".join(f"{r['task']} {r['config']} ({r['gap_to_lora']:+.2f})" for r in clear) or "none")
            + ". The others are within what another sample of test rows could change.",
        ]
    if seeds:
        lines += [
            "",
            f"Seeds (tables above: seed {first_seed(results)} only): the test metric's mean ± sample "
            "standard deviation over seeds (`seeds.csv`):",
            "",
        ]
        lines += [
            f"- {r['task']} {r['config']} r = {r['rank']}: {r['mean']:.2f} ± {r['std']:.2f} over {r['seeds']} seeds "
            f"({r['by_seed']})"
            for r in seeds
        ]
    return "\n".join([*lines, "", PAPER, ""])
