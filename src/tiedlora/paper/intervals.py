"""Bootstrap intervals over test rows: how far a test metric would move on another test set of
the same size, and whether the difference between two configurations outlasts that (the paired
bootstrap: both are scored on the same resampled rows, so what the rows share cancels).

Percentile intervals from 2,000 resamples. Each task's resamples come from a fixed seed of its
own, so a report is reproducible, every run of a task is resampled alike (which pairs them), and
two tasks' resamples are independent (which lets an average over tasks be resampled too).
"""

from __future__ import annotations

import zlib
from typing import NamedTuple

import numpy as np

DRAWS = 2000
LEVEL = 95


class Headlines(NamedTuple):
    """A run's headline metric on each resample of its test rows."""

    rows: int  # how many test rows each resample holds
    values: np.ndarray  # [DRAWS]


def resampled_rows(task: str, rows: int, draws: int = DRAWS) -> np.ndarray:
    """[draws, rows] row indices: each line a sample of `rows` rows drawn with replacement; the
    same for every run of `task` scored on that many rows."""
    rng = np.random.default_rng(zlib.crc32(f"{task}/{rows}".encode()))
    return rng.integers(0, rows, size=(draws, rows))


def headlines(task, statistics: list[list[float]], draws: int = DRAWS) -> Headlines:
    """The headline of each resample, from the task's `row_statistics` of one run's test rows."""
    stats = np.asarray(statistics, dtype=np.float64)
    rows = len(stats)
    picks = resampled_rows(task.name, rows, draws)
    counts = np.zeros((draws, rows))
    np.add.at(counts, (np.arange(draws)[:, None], picks), 1.0)
    return Headlines(rows, np.array([task.of_statistics(s, rows) for s in counts @ stats]))


def interval(values: np.ndarray) -> tuple[float, float]:
    """The central LEVEL % of the resampled values."""
    low, high = np.percentile(values, [(100 - LEVEL) / 2, (100 + LEVEL) / 2])
    return float(low), float(high)


def difference(a: Headlines | None, b: Headlines | None) -> np.ndarray | None:
    """a − b on each resample, or None when one is missing or they were scored on different
    numbers of rows (then their resamples are not the same rows)."""
    if a is None or b is None or a.rows != b.rows:
        return None
    return a.values - b.values


def mean_of(samples: list[np.ndarray | None]) -> np.ndarray | None:
    """The average over tasks on each resample (independent across tasks), or None if one is missing."""
    if not samples or any(s is None for s in samples):
        return None
    return np.mean(np.stack(samples), axis=0)  # type: ignore[arg-type]
