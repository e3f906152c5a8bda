"""Rebuild the samples bundled in src/tiedlora/tasks/data from ../shared/data.

Each file keeps the first k indices of random.Random(0).sample(range(N), N) (the rule the shared
files were cut with), lines copied byte for byte and kept in file order. Run from the repository
root: python scripts/bundle_data.py [shared data folder]
"""

import random
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "src/tiedlora/tasks/data"
SIZES = {
    "squad/validation": 200,
    "hellaswag/validation": 200,
    "iwslt2017_de_en/validation": 200,
    "iwslt2017_de_en/test": 200,
    "gsm8k/train": 200,
    "gsm8k/test": 100,
    "dialogsum/train": 100,
    "dialogsum/validation": 50,
    "dialogsum/test": 50,
}


def main(shared: Path) -> None:
    for name, k in SIZES.items():
        lines = (shared / f"{name}.jsonl").read_bytes().splitlines(keepends=True)
        keep = sorted(random.Random(0).sample(range(len(lines)), len(lines))[:k])
        out = OUT / f"{name}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"".join(lines[i] for i in keep))
        print(f"{out.relative_to(OUT)}: {len(keep)} of {len(lines)} rows, {out.stat().st_size:,} bytes")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data"))
