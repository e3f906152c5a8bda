"""The jobs of a joint run: a JSON-lines file of `{"name": ..., <tiedlora train --data options>}`,
one tenant per line, read and checked here before any model is loaded."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..config import TiedLoraError
from ..runs import JOB_NAME
from .config import TrainConfig

# Options of the base model and of the processes, the same for every tenant: given once, on the
# command line (or to JointTraining), never per job.
SHARED = ("model", "quantize", "precision", "fsdp", "out")


@dataclass
class JobSpec:
    """One tenant: a run folder name and its `tiedlora train --data` options."""

    name: str
    options: dict[str, Any]


def read_jobs(path: str | Path) -> tuple[list[JobSpec], dict[str, str]]:
    """The jobs of a JSON-lines file, and the lines refused (by name, or `line N` where the
    name itself is unusable) with why; relative `data` and `validation` paths are read from
    the file's folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TiedLoraError(f"--jobs {path}: cannot read it ({e}); give a JSON-lines file of jobs.") from None
    jobs: list[JobSpec] = []
    refused: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            job = json.loads(line)
        except json.JSONDecodeError as e:
            refused[f"line {n}"] = f"{path} line {n} is not JSON ({e.msg})."
            continue
        if not isinstance(job, dict) or not isinstance(job.get("name"), str) or not JOB_NAME.fullmatch(job["name"]):
            refused[f"line {n}"] = (
                f"{path} line {n}: each job needs a \"name\", the folder its run is written to: letters, digits, '.', "
                "'_' or '-' (at most 64, not starting with '.', '_' or '-'), or <tenant>/<name> of two such (its "
                "folder <out>/<tenant>/<name>, served to that tenant's keys alone)."
            )
            continue
        name, options = job.pop("name"), job
        if name in refused or any(j.name == name for j in jobs):
            refused[f"line {n}"] = f"{path} line {n}: the name {name!r} is taken by an earlier line; names are unique."
            continue
        nested = next((j.name for j in jobs if name.startswith(f"{j.name}/") or j.name.startswith(f"{name}/")), None)
        if nested is not None:
            refused[f"line {n}"] = (
                f"{path} line {n}: the name {name!r} and {nested!r} (an earlier line) would put one run folder inside "
                "the other; name a tenant's jobs <tenant>/<name> only."
            )
            continue
        for key in ("data", "validation"):
            if isinstance(options.get(key), str) and not Path(options[key]).is_absolute():
                local = path.parent / options[key]
                options[key] = str(local) if local.exists() or key == "validation" else options[key]
        jobs.append(JobSpec(name, options))
    return jobs, refused


def check_job(job: JobSpec) -> None:
    """A job's own options: those of a solo --data run, except what every tenant shares."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(job.options) - known)
    if "config" in unknown:
        raise TiedLoraError(f"job {job.name!r}: the option 'config' is named 'preset' now, e.g. \"preset\": \"tl6\".")
    if unknown:
        raise TiedLoraError(f"job {job.name!r}: unknown option {unknown[0]!r}; a job takes tiedlora train's options.")
    shared = sorted(set(job.options) & set(SHARED))
    if shared:
        raise TiedLoraError(
            f"job {job.name!r} sets {shared[0]!r}, which every tenant shares: give it once, on the command line."
        )
    if not isinstance(job.options.get("data"), str):
        raise TiedLoraError(f'job {job.name!r} needs "data": the path of its .jsonl, .csv or .parquet rows.')
