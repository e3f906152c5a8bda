"""HellaSwag two ways for every committed adapter (and the untrained model): the accuracy of the
generated choice digit, which the sweep reports, beside log-likelihood scoring of the four
endings (`acc`, `acc_norm`, as lm-evaluation-harness scores it), which asks whether the adapter
made the model prefer the right ending at all. Also what each run answered: the digits it
generated, and the accuracy those answers would get by chance against the test labels' mix.

    HF_HUB_OFFLINE=1 python scripts/hellaswag_loglik.py --source ../shared/data \
        --results results/smollm2-135m --out results/smollm2-135m/controls/hellaswag-loglik/scores.json
"""

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import tiedlora
from tiedlora.evaluate import choice_loglik, evaluate
from tiedlora.models import SMOLLM2, load_model
from tiedlora.runs import read_predictions, write_json
from tiedlora.tasks import TASKS
from tiedlora.tasks.metrics import choice

ANSWERS = ("0", "1", "2", "3", "other")


def answered(predictions: list[str]) -> Counter:
    return Counter(str(c) if (c := choice(p)) is not None else "other" for p in predictions)


def chance(answers: Counter, labels: Counter) -> float:
    """The accuracy of answering independently of the row, with these answers' frequencies."""
    rows = sum(labels.values())
    return 100 * sum(answers[str(k)] * labels[k] for k in labels) / (sum(answers.values()) * rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default="../shared/data")
    p.add_argument("--results", type=Path, default=Path("results/smollm2-135m"))
    p.add_argument("--rows", type=int, default=150, help="the first rows of the test split, as the sweep scored")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("results/smollm2-135m/controls/hellaswag-loglik/scores.json"))
    args = p.parse_args()

    task = TASKS["hellaswag"]
    rows = task.load("test", args.source)[: args.rows]
    labels = Counter(int(r["label"]) for r in rows)
    model, tokenizer = load_model(SMOLLM2)
    scored = {}
    started = time.perf_counter()
    base = evaluate(model, tokenizer, task, rows, 8, 32, progress=False)
    scored["base"] = {
        "generated": base["accuracy"],
        **choice_loglik(model, tokenizer, task, rows, args.batch_size),
        "answers": answered(base["predictions"]),
    }
    for folder in sorted((args.results / "adapters" / "hellaswag").iterdir()):
        run = json.loads((folder / "results.json").read_text())
        cell = Path(run["recipe"]["out"]).name
        (predictions,) = (args.results / "sweep").glob(f"hellaswag/**/{cell}/predictions.jsonl")  # exactly one
        tiedlora.load(model, folder)
        scored[folder.name] = {
            "rank": run["rank"],
            "lr": run["recipe"]["lr"],
            "validation_loss": run["validation"]["best"],
            "generated": run["metrics"]["accuracy"],
            **choice_loglik(model, tokenizer, task, rows, args.batch_size),
            "answers": answered(read_predictions(predictions.parent)),
        }
        tiedlora.remove(model)
        print(folder.name, {k: v for k, v in scored[folder.name].items() if k != "answers"}, flush=True)
    for s in scored.values():
        s["chance_given_answers"] = chance(s["answers"], labels)
    print(f"\n{len(rows)} test rows; labels {dict(sorted(labels.items()))}; {time.perf_counter() - started:.0f} s\n")
    answers = "/".join(ANSWERS)
    print(f"| model | r | lr | generated | chance given its answers | acc | acc_norm | answers {answers} |")
    print("|---|---|---|---|---|---|---|---|")
    for name, s in scored.items():
        print(
            f"| {name} | {s.get('rank', '')} | {s.get('lr', '')} | {s['generated']:.2f} | "
            f"{s['chance_given_answers']:.2f} | {s['acc']:.2f} | {s['acc_norm']:.2f} | "
            + "/".join(str(s["answers"][a]) for a in ANSWERS)
            + " |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"rows": len(rows), "source": args.source, "labels": labels, "models": scored}
    write_json(args.out, summary)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
