"""The benchmark must keep working: its quick configuration runs end to end and reports figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(180)
def test_quick_benchmark_runs_and_reports_both_servers(tmp_path: Path) -> None:
    """The Python load client (`--client py`) against both servers."""
    out = tmp_path / "quick.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "fanout.py"), "--quick", "--client", "py", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=170,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["summary"]["rows"]
    assert {r["server"] for r in rows} == {"gateway", "naive"}
    for r in rows:
        assert r["achieved"] > 0 and r["p99_ms"] > 0 and r["rss_kib_per_conn"] > 0


@pytest.mark.timeout(180)
def test_quick_benchmark_with_the_compiled_load_client(tmp_path: Path) -> None:
    """`--client c` (the default) compiles bench/wsload.c and measures the same figures through it."""
    out = tmp_path / "quick-c.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "fanout.py"), "--quick", "--client", "c", "--servers", "gateway",
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=170,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["summary"]["rows"]
    assert row["server"] == "gateway"
    assert row["achieved"] > 0 and row["p99_ms"] > 0 and row["rss_kib_per_conn"] > 0


@pytest.mark.timeout(180)
def test_quick_benchmark_against_a_baseline_revision(tmp_path: Path) -> None:
    """`--baseline REV` measures gateway/ of REV as server 'baseline' beside the working tree's gateway."""
    out = tmp_path / "quick-ab.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "fanout.py"), "--quick", "--baseline", "HEAD", "--servers",
         "gateway,baseline", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=170,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    rows = doc["summary"]["rows"]
    assert {r["server"] for r in rows} == {"gateway", "baseline"}
    for r in rows:
        assert r["achieved"] > 0 and r["p99_ms"] > 0 and r["rss_kib_per_conn"] > 0
    assert doc["baseline_code"]["rev"] == "HEAD" and len(doc["baseline_code"]["commit"]) == 40
    (ab,) = doc["summary"]["ab"]
    for key in ("p99_at_target_ms", "cpu_s_per_1m", "rss_kib_per_conn"):
        assert ab["figures"][key]["ratio"] > 0, key
    assert all(s["gateway"] and s["baseline"] for s in doc["summary"]["ab_steps"])
    assert "Side by side: gateway = " in proc.stdout and "baseline = " in proc.stdout


@pytest.mark.timeout(180)
def test_quick_resilience_benchmark_reports_every_figure(tmp_path: Path) -> None:
    """bench/resilience.py (the delays the tests no longer assert) runs end to end and reports them."""
    out = tmp_path / "resilience.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "resilience.py"), "--quick", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=170,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = json.loads(out.read_text())["figures"]
    assert set(figures) == {"fast", "replay", "restart"}
    assert figures["fast"]["n"] > 0 and figures["fast"]["complete_in_order"] is True
    assert figures["replay"]["n"] > 0 and figures["replay"]["replayed"] > 0
    assert figures["restart"]["stall"]["n"] > 0 and figures["restart"]["complete_in_order"] is True
    assert figures["restart"]["revocation_s"] > 0 and figures["restart"]["ready_after_start_s"] > 0
    assert "fast client beside a stalled one" in proc.stdout and "revocation" in proc.stdout


def test_hotpath_benchmark_measures_the_working_tree_and_a_revision() -> None:
    """bench/hotpath.py in its smallest form, the working tree against gateway/ of HEAD."""
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "hotpath.py"), "--baseline", "HEAD", "--rounds", "1", "--repeat", "1",
         "--connections", "200", "--scopes", "10", "--flushes", "5"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert any(line.strip().startswith("working tree") for line in lines), out.stdout
    assert any(line.strip().startswith("baseline HEAD") for line in lines), out.stdout
    assert any(line.strip().startswith("ratio working tree / baseline") for line in lines), out.stdout


def test_hotpath_benchmark_counts_instructions_under_valgrind() -> None:
    """bench/hotpath.py --instructions in its smallest form (the working tree only)."""
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "hotpath.py"), "--instructions", "--connections", "200", "--scopes",
         "10", "--flushes", "5"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(x for x in out.stdout.splitlines() if x.strip().startswith("working tree"))
    assert float(line.split()[-1]) > 0, out.stdout
