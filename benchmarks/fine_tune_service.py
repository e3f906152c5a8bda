"""One fine-tune through `tiedlora serve --state`, end to end with the official `openai` client, on
the real SmolLM2-135M: upload, create, poll, events, then the base model and the fine-tuned one
scored on held-out questions through the same client.

    python benchmarks/fine_tune_service.py --out /tmp/ft --json benchmarks/fine_tune_service_cpu.json

Starts the server as a user would (`python -m tiedlora serve --model smollm2-135m --state ...`
with a tenants file, `--port 0`), uploads --rows SQuAD validation rows from ../shared/data as
prompt/completion lines ("Context: ... Question: ... Answer:" and the first answer), creates a
job with every hyperparameter and the adapter left at their defaults (`auto`; --epochs,
--batch_size, --multiplier and --config set them), polls it every second, and prints the
transcript: each call with the seconds since the upload began, and every event (the loss curve
among them). Then 50 questions whose context paragraphs no training row shares (from the end of
the file; `--held_out FILE` of SQuAD rows instead) go to the base model and to the fine-tuned one,
greedy, 16 tokens, the answer's first line scored by SQuAD's exact match and F1 against every
reference answer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from hyperparameters import DATA, split, squad_line  # benchmarks/hyperparameters.py: the same rows and split
from timing import cpu_name  # benchmarks/timing.py, beside this script

KEY = "acme-key-benchmark-0123456789"


def scores(client, model: str, held: list[dict]) -> dict:
    """Exact match and F1 of `model`'s greedy answers to the held-out questions (the first line of each)."""
    from tiedlora.tasks import metrics

    answers = []
    for start in range(0, len(held), 16):
        prompts = [squad_line(r)["prompt"] for r in held[start : start + 16]]
        reply = client.completions.create(model=model, prompt=prompts, max_tokens=16, temperature=0)
        answers += [c.text for c in sorted(reply.choices, key=lambda c: c.index)]
    found = metrics.squad([a.strip().split("\n")[0] for a in answers], [r["answers"]["text"] for r in held])
    return {"exact_match": round(found["exact_match"], 2), "f1": round(found["f1"], 2), "first": answers[0]}


def start_server(out: Path, model: str, precision: str) -> tuple[subprocess.Popen, int]:
    keys = out / "keys.json"
    keys.write_text(json.dumps({"acme": [KEY]}))
    command = [
        sys.executable,
        "-m",
        "tiedlora",
        "serve",
        "--model",
        model,
        "--port",
        "0",
        "--state",
        str(out / "state"),
    ]
    command += ["--tenants", str(keys), "--adapters", str(out / "adapters"), "--train_precision", precision]
    log = open(out / "server.log", "w")
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines: list[str] = []

    def read() -> None:
        for line in process.stderr:  # type: ignore[union-attr]
            lines.append(line)
            log.write(line)
            log.flush()

    threading.Thread(target=read, daemon=True).start()
    end = time.monotonic() + 300
    while not any(" on http://" in line for line in lines):
        if process.poll() is not None or time.monotonic() > end:
            raise SystemExit("the server did not start:\n" + "".join(lines))
        time.sleep(0.2)
    port = int(next(line for line in lines if " on http://" in line).rsplit(":", 1)[1].split("/")[0])
    return process, port


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--epochs", type=int, help="n_epochs (default: auto)")
    p.add_argument("--batch_size", type=int, help="batch_size (default: auto)")
    p.add_argument("--multiplier", type=float, help="learning_rate_multiplier (default: auto)")
    p.add_argument("--config", help="the adapter's configuration (default: the API's, tl6)")
    p.add_argument("--held_out", help="a JSON-lines file of SQuAD rows to score on instead")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--json")
    args = p.parse_args()
    from openai import OpenAI

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    train, held = split(rows, args.rows)
    if args.held_out:
        held = [json.loads(line) for line in Path(args.held_out).read_text().splitlines() if line.strip()]
    (out / "train.jsonl").write_text("".join(json.dumps(squad_line(r)) + "\n" for r in train))

    booted = time.perf_counter()
    process, port = start_server(out, args.model, args.precision)
    transcript: list[dict] = []
    figures: dict = {"server_start_s": round(time.perf_counter() - booted, 1)}
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=600)
        t0 = time.perf_counter()

        def say(call: str, result) -> None:
            line = {"t_s": round(time.perf_counter() - t0, 1), "call": call, "result": result}
            transcript.append(line)
            print(json.dumps(line), flush=True)

        upload = client.files.create(file=open(out / "train.jsonl", "rb"), purpose="fine-tune")
        say("files.create", {"id": upload.id, "bytes": upload.bytes})
        given = {"n_epochs": args.epochs, "batch_size": args.batch_size, "learning_rate_multiplier": args.multiplier}
        hyperparameters = {k: v for k, v in given.items() if v is not None}
        extra = {"extra_body": {"adapter": {"config": args.config}}} if args.config else {}
        job = client.fine_tuning.jobs.create(
            model=args.model,
            training_file=upload.id,
            suffix="squad",
            seed=0,
            **({"hyperparameters": hyperparameters} if hyperparameters else {}),
            **extra,
        )
        say("fine_tuning.jobs.create", {"id": job.id, "status": job.status})
        status = job.status
        while status not in ("succeeded", "failed", "cancelled"):
            time.sleep(1)
            job = client.fine_tuning.jobs.retrieve(job.id)
            if job.status != status:
                status = job.status
                say("fine_tuning.jobs.retrieve", {"status": status, "trained_tokens": job.trained_tokens})
        if status != "succeeded":
            raise SystemExit(f"the job {status}: {job.error}")
        say("fine_tuning.jobs.retrieve", {"fine_tuned_model": job.fine_tuned_model})
        reply = client.completions.create(
            model=job.fine_tuned_model, prompt=squad_line(held[0])["prompt"], max_tokens=16
        )
        say("completions.create", {"model": job.fine_tuned_model, "text": reply.choices[0].text})
        figures["upload_to_first_completion_s"] = round(time.perf_counter() - t0, 1)
        held_out = {name: scores(client, name, held) for name in (args.model, job.fine_tuned_model)}
        say("held-out scores", held_out)
        events = [e for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data][::-1]
        checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    finally:
        process.terminate()
        process.wait(60)
    figures.update(
        job=job.id,
        model=args.model,
        rows=args.rows,
        hyperparameters=job.hyperparameters.model_dump(),
        adapter=job.model_extra.get("adapter") if job.model_extra else None,
        trained_tokens=job.trained_tokens,
        events=[{"t": e.created_at - job.created_at, "message": e.message} for e in events],
        loss_curve=[e.data for e in events if e.type == "metrics"],
        checkpoints=[{"step": c.step_number, "metrics": c.metrics.model_dump()} for c in checkpoints],
        held_out_rows=len(held),
        before=held_out[args.model],
        after=held_out[job.fine_tuned_model],
        transcript=transcript,
        precision=args.precision,
        cpu=cpu_name(),
    )
    for e in events:
        print(f"+{e.created_at - job.created_at:4d} s  {e.message}")
    print(json.dumps({k: v for k, v in figures.items() if k not in ("events", "transcript")}), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
