"""Committed generated files: write them, or check that the committed copy is current.

The CRD (`python -m wsgateway_operator.crd`), the alert rules (`dashboards/gen_rules.py`) and the
Grafana dashboards (`dashboards/gen_dashboards.py`) are generated from code and committed; each
generator writes its file, and its `--check` mode (what the staleness tests run) exits 1 when the
committed copy differs.
"""

from __future__ import annotations

import sys
from pathlib import Path


def write_or_check(path: Path, text: str, *, check: bool, how_to_regenerate: str) -> bool:
    """Write `text` to `path` (check=False), or report whether `path` already holds it (check=True).

    Returns False only when checking and the file is stale (missing or different); says so on stderr.
    A current file is not rewritten (its mtime stays).
    """
    current = path.read_text(encoding="utf-8") if path.exists() else None
    if current == text:
        return True
    if check:
        print(f"{path} is stale: run {how_to_regenerate}", file=sys.stderr)
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}")
    return True
