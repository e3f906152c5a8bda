"""Run folders: what `tiedlora train` writes, and how other commands find adapters in it.

A run folder holds `run.json` (the options and versions), `best/` (the adapter kept on
validation), `checkpoint/` (the latest training state), `log.csv`, `tensorboard/`,
`predictions.jsonl` (`samples.jsonl` with own data) and, once finished, `results.json`.
Anywhere an adapter is expected, a run folder stands for its `best/`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from .adapter_file import CONFIG
from .atomic import json_bytes, write_atomic
from .config import TiedLoraError

RUN = "run.json"
RESULTS = "results.json"
BEST = "best"
CHECKPOINTS = "checkpoint"
LOG = "log.csv"
PREDICTIONS = "predictions.jsonl"
SAMPLES = "samples.jsonl"  # own data: a few generations beside the prompts and references
# A folder name a client may give: a tenant's name, a job's name (one folder of `tiedlora train --jobs`'s --out).
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# A job's name: NAME, or <tenant>/<name>, whose run folder is <out>/<tenant>/<name>, served to that tenant alone.
JOB_NAME = re.compile(rf"{NAME.pattern}(/{NAME.pattern})?")


def is_run(folder: Path) -> bool:
    return (Path(folder) / RUN).is_file()


def best_adapter(folder: Path) -> Path:
    """A run folder stands for the adapter it kept (best/); any other folder for itself."""
    folder = Path(folder)
    return folder / BEST if is_run(folder) else folder


def open_adapter(adapter: str, model_name: str | None, base: bool = False, as_trained: bool = True):
    """(model, tokenizer, run options or None) for a run folder (its model and its best adapter)
    or an adapter folder; with `base`, the model without the adapter. `as_trained` quantizes
    the base as the run did (--quantize); without it the base stays in full precision."""
    from .adapter_file import load
    from .models import SMOLLM2, load_model
    from .quantize import quantize

    run = run_options(Path(adapter))
    folder = best_adapter(Path(adapter))
    if not (folder / CONFIG).is_file():
        raise TiedLoraError(
            f"--adapter {adapter}: no run folder (run.json) with a best/ adapter, nor an adapter folder ({CONFIG})."
        )
    model, tokenizer = load_model(model_name or (run or {}).get("model") or SMOLLM2)
    bits = (run or {}).get("quantize")
    if as_trained and bits:
        quantize(model, bits)
    if not base:
        load(model, folder)
    return model, tokenizer, run


# Options recorded under an earlier name: run folders (and stored jobs) written before keep theirs.
RENAMED = {"config": "preset"}


def renamed(options: dict) -> dict:
    """Recorded options under today's names."""
    return {RENAMED.get(k, k): v for k, v in options.items()}


def run_options(folder: Path) -> dict | None:
    """The options a run folder was trained with, or None for a plain adapter folder."""
    if not is_run(folder):
        return None
    run = read_json(Path(folder) / RUN)
    if not isinstance(run, dict) or not isinstance(run.get("config"), dict):
        raise TiedLoraError(
            f'{Path(folder) / RUN} is damaged: expected {{"config": {{...}}, "versions": {{...}}}}; '
            "restore it, or train again in another --out."
        )
    return renamed(run["config"])


def clean_stale(folder: Path) -> None:
    """Remove the temporary files and folders that writes killed half-way leave behind."""
    for stale in sorted(Path(folder).rglob(".*.tmp"), key=lambda p: -len(p.parts)):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def read_json(path: Path):
    """A JSON file of a run; a damaged one is named, with what is wrong."""
    try:
        return json.loads(Path(path).read_bytes())
    except OSError as e:
        raise TiedLoraError(f"Cannot read {path} ({e.strerror or e}).") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise TiedLoraError(f"{path} is damaged: not JSON ({type(e).__name__}: {str(e)[:100]}).") from None


def write_json(path: Path, data) -> None:
    write_atomic(Path(path), json_bytes(data))


def write_jsonl(path: Path, lines: list[dict]) -> None:
    """A JSON Lines file of a run (predictions.jsonl, samples.jsonl), written atomically."""
    write_atomic(Path(path), "".join(json.dumps(line) + "\n" for line in lines).encode())


def read_predictions(folder: Path) -> list[str]:
    """The test predictions a run wrote (`Task.predictions_file`), in the order of its test rows;
    a damaged file raises the ValueError, KeyError or TypeError of the first bad line."""
    lines = (Path(folder) / PREDICTIONS).read_text().splitlines()
    return [json.loads(line)["prediction"] for line in lines if line.strip()]


def adapter_folder(root: Path, path: str) -> Path:
    """The adapter folder at `path` (relative to `root`, or absolute inside it; a run folder
    gives its best/), resolved, links included, and refused unless it stays inside root."""
    base = Path(root).resolve()
    try:
        if not path or "\0" in path or len(path) > 4096:
            raise ValueError("empty, too long or holding a NUL byte")
        folder = (base / path).resolve()
        if folder.is_relative_to(base):
            folder = best_adapter(folder).resolve()
        inside = folder.is_relative_to(base)
        found = inside and (folder / CONFIG).is_file()
    except (OSError, ValueError, RuntimeError) as e:  # too long a name, a NUL byte, a link loop
        raise TiedLoraError(
            f"Adapter path {path[:80]!r} is not a usable path ({e}); pass a folder under {root}."
        ) from None
    if not inside:
        raise TiedLoraError(f"Adapter path {path!r} leads outside the adapters root {root}; pass a folder inside it.")
    if not found:
        raise TiedLoraError(
            f"Adapter path {path!r}: {folder} is neither a run folder ({RUN} and {BEST}/) "
            f"nor an adapter folder ({CONFIG})."
        )
    return folder


def discover(root: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """Every run folder and adapter folder under root, named by its path relative to root (root
    itself by its own name), and the folders refused with the reason. The search does not
    descend into them: a run's checkpoint/ is not an adapter to serve."""
    root = Path(root)
    found, refused = {}, {}
    for here, dirs, files in os.walk(root):
        dirs.sort()
        if RUN in files or CONFIG in files:
            relative = Path(here).relative_to(root).as_posix()
            name = root.resolve().name if relative == "." else relative
            try:
                found[name] = adapter_folder(root, relative)
            except TiedLoraError as e:
                refused[name] = str(e)
            dirs.clear()
    return found, refused


def load_runs(folder) -> list[tuple[Path, dict]]:
    """Every run folder under a sweep folder, with its results.json."""
    found = [(p.parent, read_json(p)) for p in sorted(Path(folder).rglob(RESULTS))]
    if not found:
        raise TiedLoraError(f"{folder} holds no {RESULTS}: run `tiedlora sweep --out {folder}` first.")
    return found
