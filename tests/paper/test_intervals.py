"""Bootstrap intervals over test rows: every task's fast path (summed row statistics) against
scoring each resample from scratch, intervals against the binomial standard error, the paired
difference, and the report's table2.csv and summary.md from real predictions."""

import csv
import json
import math

import numpy as np
import pytest
import sacrebleu

from tiedlora import TiedLoraError
from tiedlora.cli import main
from tiedlora.paper.intervals import difference, headlines, interval, resampled_rows
from tiedlora.paper.report import report
from tiedlora.paper.sweep import Cell
from tiedlora.tasks import TASKS


def answers(task, rows, right_every=2):
    """Predictions that are right on every other row and wrong (or partly right) on the rest."""
    out = []
    for i, row in enumerate(rows):
        right = {
            "squad": lambda r: r["answers"]["text"][0],
            "dialogsum": lambda r: task.target(r),
            "hellaswag": lambda r: str(r["label"]),
            "gsm8k": lambda r: r["answer"],
            "iwslt2017-de-en": lambda r: r["en"],
        }[task.name](row)
        words = right.split()
        out.append(right if i % right_every == 0 else " ".join(words[: len(words) // 2]) or "none")
    return out


@pytest.mark.parametrize("name", list(TASKS))
def test_each_resample_scores_as_scoring_it_from_scratch(name):
    task = TASKS[name]
    rows = task.load("test", "bundled")[:20]
    predictions = answers(task, rows)
    draws = 40
    fast = headlines(task, task.row_statistics(predictions, rows), draws)
    whole = task.of_statistics(np.sum(task.row_statistics(predictions, rows), axis=0), len(rows))
    assert whole == pytest.approx(next(iter(task.score(predictions, rows).values())), abs=1e-9)
    for picks, value in zip(resampled_rows(name, len(rows), draws), fast.values):
        again = task.score([predictions[i] for i in picks], [rows[i] for i in picks])
        assert value == pytest.approx(next(iter(again.values())), abs=1e-9)
    assert fast.values.std() > 0  # the resamples differ


def test_bleu_of_summed_statistics_is_sacrebleus_corpus_bleu():
    from tiedlora.tasks.metrics import bleu_of_statistics, bleu_statistics

    rows = TASKS["iwslt2017-de-en"].load("test", "bundled")
    refs = [r["en"] for r in rows]
    # every other word; and each word of letters then "qqq", which matches no 2-gram (smoothing decides the score)
    for hyps in (
        [" ".join(r.split()[::2]) for r in refs],
        [" qqq ".join(w for w in r.split() if w.isalpha()) + " qqq" for r in refs],
    ):
        stats = bleu_statistics(hyps, refs)
        corpus = sacrebleu.corpus_bleu(hyps, [refs]).score
        assert corpus > 0 and bleu_of_statistics(np.sum(stats, axis=0)) == pytest.approx(corpus)


def test_an_accuracy_interval_matches_the_binomial_standard_error():
    """Half of 100 rows right: the 95 % interval is about 50 ± 1.96·sqrt(.25/100)·100 = ± 9.8."""
    task = TASKS["hellaswag"]
    rows = [{"label": i % 4} for i in range(100)]
    predictions = [str(r["label"]) if i % 2 == 0 else str((r["label"] + 1) % 4) for i, r in enumerate(rows)]
    low, high = interval(headlines(task, task.row_statistics(predictions, rows)).values)
    half = 1.96 * math.sqrt(0.25 / 100) * 100
    assert low == pytest.approx(50 - half, abs=1.5) and high == pytest.approx(50 + half, abs=1.5)


def test_the_paired_difference_cancels_what_two_runs_share():
    task = TASKS["hellaswag"]
    rows = [{"label": i % 4} for i in range(100)]
    base = [str(r["label"]) if i % 2 == 0 else "9" for i, r in enumerate(rows)]
    better = [str(r["label"]) if i % 2 == 0 or i < 20 else "9" for i, r in enumerate(rows)]  # 10 more right
    a, b = (headlines(task, task.row_statistics(p, rows)) for p in (better, base))
    gap = difference(a, b)
    assert gap is not None and gap.min() >= 0  # better is right wherever base is, on every resample
    low, high = interval(gap)
    assert 0 < low < 10 < high < 20
    unpaired = interval(a.values - np.random.default_rng(1).permutation(b.values))
    assert unpaired[1] - unpaired[0] > 2 * (high - low)  # pairing is what makes the difference clear
    assert interval(difference(b, b)) == (0.0, 0.0)
    assert difference(a, headlines(task, task.row_statistics(base[:50], rows[:50]))) is None  # other rows


def write_run(sweep, task, config, predictions, rows, metric=None, val=1.0, rank=8):
    folder = sweep / Cell(task.name, config, rank, 1e-3, None).name
    folder.mkdir(parents=True)
    scores = task.score(predictions, rows)
    if metric is not None:
        scores = {next(iter(scores)): metric}
    results = {
        "task": task.name,
        "config": config,
        "rank": rank,
        "params": {"lora": 1000, "tl5": 30, "tl6": 100}[config] * rank // 8,
        "metrics": scores,
        "validation": {"on": "loss", "best": val},
        "recipe": {"lr": 1e-3, "layers": None},
        "data": {"test": {"source": "bundled"}, "test_rows_used": len(rows)},
    }
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "predictions.jsonl").write_text("".join(json.dumps({"prediction": p}) + "\n" for p in predictions))
    return folder


@pytest.fixture
def sweep(tmp_path):
    """squad: tl6 right on 6 more of 27 rows than LoRA at r = 8 (its best rank is 2), tl5 on
    none of LoRA's 9; gsm8k: LoRA and tl6 right on the same rows."""
    squad, gsm8k = TASKS["squad"], TASKS["gsm8k"]
    rows = squad.load("test", "bundled")
    lora = answers(squad, rows, right_every=3)
    tl6 = [rows[i]["answers"]["text"][0] if i < 9 else p for i, p in enumerate(lora)]
    write_run(tmp_path / "sweep", squad, "lora", lora, rows)
    write_run(tmp_path / "sweep", squad, "tl6", tl6, rows)
    write_run(tmp_path / "sweep", squad, "tl6", answers(squad, rows), rows, val=0.9, rank=2)
    write_run(tmp_path / "sweep", squad, "tl5", ["none"] * len(rows), rows)
    rows = gsm8k.load("test", "bundled")[:40]
    for config in ("lora", "tl6"):
        write_run(tmp_path / "sweep", gsm8k, config, answers(gsm8k, rows), rows)
    return tmp_path / "sweep"


def test_table_2_and_the_summary_carry_the_intervals(sweep, tmp_path):
    written = report(sweep, tmp_path / "out")
    by = {(r["task"], r["config"]): r for r in written["table2"]}
    with open(tmp_path / "out" / "table2.csv") as f:
        rows = {(r["task"], r["config"]): r for r in csv.DictReader(f)}
    for key, row in by.items():
        assert row["ci_low"] <= row["metric_at_lora_rank"] <= row["ci_high"], key
        assert float(rows[key]["ci_low"]) == row["ci_low"] and float(rows[key]["ci_high"]) == row["ci_high"]
    squad = by[("squad", "tl6")]
    assert squad["best_rank"] == 2 and squad["metric_at_best_rank"] != squad["metric_at_lora_rank"]
    assert squad["ci_low_at_best_rank"] <= squad["metric_at_best_rank"] <= squad["ci_high_at_best_rank"]
    assert squad["ci_low_at_best_rank"] != squad["ci_low"]
    assert squad["gap_to_lora"] == pytest.approx(100 * 6 / 27)
    assert 0 < squad["gap_ci_low"] < squad["gap_to_lora"] < squad["gap_ci_high"]
    assert by[("gsm8k", "tl6")]["gap_ci_low"] == by[("gsm8k", "tl6")]["gap_ci_high"] == 0.0
    average = by[("average", "tl6")]
    squad_rows, gsm8k_rows = TASKS["squad"].load("test", "bundled"), TASKS["gsm8k"].load("test", "bundled")[:40]
    tl6_squad = [
        r["answers"]["text"][0] if i < 9 else p
        for i, (r, p) in enumerate(zip(squad_rows, answers(TASKS["squad"], squad_rows, 3)))
    ]
    both = [
        headlines(task, task.row_statistics(p, rows)).values
        for task, p, rows in [
            (TASKS["squad"], tl6_squad, squad_rows),
            (TASKS["gsm8k"], answers(TASKS["gsm8k"], gsm8k_rows), gsm8k_rows),
        ]
    ]
    assert (average["ci_low"], average["ci_high"]) == pytest.approx(interval((both[0] + both[1]) / 2))
    assert average["gap_to_lora"] == pytest.approx(100 * 6 / 27 / 2)
    assert average["gap_ci_low"] == pytest.approx(squad["gap_ci_low"] / 2)  # gsm8k's gap is 0 on every resample
    gap = written["gaps"]["tl6"]
    assert (gap["ci_low"], gap["ci_high"]) == (average["gap_ci_low"], average["gap_ci_high"])
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert f"- tl6: +11.11 points, 95 % interval [{gap['ci_low']:+.2f}, {gap['ci_high']:+.2f}]" in summary
    assert "| squad | tl6 | **+22.22** |" in summary and "| gsm8k | tl6 | +0.00 |" in summary
    assert "2 of these 3 differences exclude zero: squad tl5 (-33.33), squad tl6 (+22.22)" in summary


def test_predictions_that_do_not_give_the_recorded_metric_are_refused(sweep, tmp_path):
    squad = TASKS["squad"]
    rows = squad.load("test", "bundled")
    write_run(sweep / "other", squad, "lora", answers(squad, rows), rows, metric=12.0, val=0.5)
    with pytest.raises(TiedLoraError, match="predictions do not give the 12.0000 .* pass --source"):
        report(sweep, tmp_path / "out")


def test_test_rows_that_cannot_be_read_name_the_fix(sweep, tmp_path, capsys):
    args = ["report", str(sweep), "--out", str(tmp_path / "out"), "--source", str(tmp_path / "nowhere")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "its test rows cannot be read" in err and "--no_intervals" in err
    assert main([*args, "--no_intervals"]) == 0
    with open(tmp_path / "out" / "table2.csv") as f:
        assert all(r["ci_low"] == "" and r["gap_ci_low"] == "" for r in csv.DictReader(f))
