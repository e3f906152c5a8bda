"""Pack a sweep for the trip back from the device (its $OUT takes 8 files of 16 MiB at most): the
results, logs and predictions of every cell, and each (task, configuration)'s best adapter over
ranks, chosen on validation as the report chooses it.

    python scripts/device/pack.py sweeps/smollm2-135m $OUT
"""

import json
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from tiedlora.paper.report import best, select
from tiedlora.runs import load_results


def main(sweep: Path, out: Path) -> None:
    chosen = select(load_results(sweep))
    picks = Path(tempfile.mkdtemp())
    for task, config in sorted({(k[0], k[1]) for k in chosen if k[3] is None}):
        runs = {k[2]: r for k, r in chosen.items() if k[0] == task and k[1] == config and k[3] is None}
        run = runs[best(runs)]
        shutil.copytree(Path(run["recipe"]["out"]) / "best", picks / task / config)
        (picks / task / config / "results.json").write_text(json.dumps(run, indent=2))
    with tarfile.open(out / "adapters.tar.xz", "w:xz") as t:
        t.add(picks, "adapters")
    skipped = ("/checkpoint", "/tensorboard", "/best")  # resumable state and adapters other than the picks
    with tarfile.open(out / "sweep.tar.xz", "w:xz") as t:
        t.add(sweep, "sweep", filter=lambda info: None if any(s in info.name for s in skipped) else info)
    print("packed", {p.name: p.stat().st_size for p in out.glob("*.tar.xz")})


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
