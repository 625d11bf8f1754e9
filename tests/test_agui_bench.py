"""bench/agui_join.py must keep working: its quick configuration runs end to end and reports its figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_quick_agui_join_benchmark_reports_both_endpoints(tmp_path: Path) -> None:
    out = tmp_path / "agui_join.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "agui_join.py"), "--quick", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=170, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert len(res["agui"]) == len(res["sse"]) == 2
    # the prelude: RUN_STARTED, MESSAGES_SNAPSHOT, TEXT_MESSAGE_START; the replay: every event of the scope
    assert res["agui_median"]["frames"] == 3
    assert res["sse_median"]["frames"] == 20 + 2 + 200 + 2  # messages, run and message start, deltas, control
    assert "time to render the answer" in proc.stdout
