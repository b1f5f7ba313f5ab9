"""What every study script writes: <out>.json (all figures), <out>.md (its table), <out>.png (its plot)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


def write_study(results: dict, out: Path, table: Callable[[dict], str], plot: Callable[[dict, Path], None]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(table(results))
    plot(results, out.with_suffix(".png"))
    print(table(results))
    print(f"wrote {out}.json, .md, .png")
