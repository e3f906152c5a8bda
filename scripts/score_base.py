"""The untrained SmolLM2-135M-Instruct on the first rows of each task's test split, greedy
decoding: the floor a trained adapter has to beat. Prints a table and writes JSON (scores, the
data's source and split rule, every prediction).

    HF_HUB_OFFLINE=1 python scripts/score_base.py --source ../shared/data --rows 50 --out runs/base.json
"""

import argparse
import json
import time
from pathlib import Path

from tiedlora import tasks
from tiedlora.evaluate import choice_loglik, evaluate
from tiedlora.models import SMOLLM2, load_model

# New-token caps for this measurement (the API's default is the paper's 500): room for each
# task's answers, so a model that never emits EOS costs minutes on a CPU, not hours.
MAX_NEW_TOKENS = {"squad": 32, "dialogsum": 128, "hellaswag": 16, "iwslt2017-de-en": 128, "gsm8k": 256}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default="bundled", help="bundled, hub, or a data folder such as ../shared/data")
    p.add_argument("--rows", type=int, default=50)
    p.add_argument("--chat", action="store_true", help="prompt through the tokenizer's chat template")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("runs/base_scores.json"))
    args = p.parse_args()

    model, tokenizer = load_model(SMOLLM2)
    results = {}
    for name, task in tasks.TASKS.items():
        rows = task.load("test", args.source)
        start = time.perf_counter()
        scores = evaluate(model, tokenizer, task, rows[: args.rows], MAX_NEW_TOKENS[name], args.batch_size, args.chat)
        if name == "hellaswag":
            scores.update(choice_loglik(model, tokenizer, task, rows[: args.rows], args.batch_size))
        results[name] = {
            "seconds": round(time.perf_counter() - start, 1),
            "rows": len(rows[: args.rows]),
            "max_new_tokens": MAX_NEW_TOKENS[name],
            "data": rows.info,
            **scores,
        }
        print(name, {k: round(v, 2) for k, v in scores.items() if k != "predictions"}, flush=True)

    print(f"\n{SMOLLM2}, {args.rows} test rows per task, greedy, chat={args.chat}")
    print(f"{'task':<16} {'max new':>7} {'seconds':>8}  scores (0-100)")
    for name, r in results.items():
        shown = ", ".join(f"{k} {r[k]:.2f}" for k in r if isinstance(r[k], float) and k != "seconds")
        print(f"{name:<16} {r['max_new_tokens']:>7} {r['seconds']:>8}  {shown}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"model": SMOLLM2, "chat": args.chat, "tasks": results}, indent=1, ensure_ascii=False)
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
