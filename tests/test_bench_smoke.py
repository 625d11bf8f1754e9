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
    doc = json.loads(out.read_text())
    (row,) = doc["summary"]["rows"]
    assert row["server"] == "gateway"
    assert row["achieved"] > 0 and row["p99_ms"] > 0 and row["rss_kib_per_conn"] > 0
    (point,) = doc["points"]  # the descriptors it held with every client connected: the ceiling's figures
    assert point["server_fds"] > point["connected"] == 300 and point["server_fd_limit"] >= point["server_fds"]


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


@pytest.mark.timeout(180)
def test_quick_storm_benchmark_kills_an_instance_and_reports_the_curve(tmp_path: Path) -> None:
    """bench/storm.py --quick: two `wsgateway serve` processes, A SIGKILLed, its clients resume on B."""
    out = tmp_path / "storm.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "storm.py"), "--quick", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=170,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (r,) = json.loads(out.read_text())["results"]
    assert r["connected"] == r["movers"] + r["stayers"] == 600
    assert r["resubscribed_s"]["count"] > 0  # movers resumed on B (how many in time: the figures)
    assert r["lost"] == 0 and r["doubled"] == 0 and r["stray"] == 0  # correctness, not speed
    assert set(r["curve_pct_live"]) >= {"1", "10"} and r["stayers_delay_ms_10s"]["p99"] >= 0
    assert "% live at 10 s" in proc.stdout and "stayers delay p99" in proc.stdout


@pytest.mark.timeout(180)
def test_quick_compact_benchmark_reports_both_modes(tmp_path: Path) -> None:
    """bench/compact.py --quick: a reload mid-answer with and without compact catch-up."""
    out = tmp_path / "compact.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "compact.py"), "--quick", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=170,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = json.loads(out.read_text())
    assert s["same_text"] is True  # the merged replay renders the same answer
    assert s["compact"]["frames"] < s["full"]["frames"] and s["compact"]["history_items"] < s["full"]["history_items"]
    assert s["full"]["render_ms"] > 0 and s["compact"]["bytes"] > 0
    assert "time to complete render" in proc.stdout


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


def test_inbox_benchmark_loads_every_request() -> None:
    """bench/inbox.py in its smallest form: the start-up load reads every request the stream holds."""
    out = subprocess.run([sys.executable, str(REPO / "bench" / "inbox.py"), "--processes", "60", "--rounds", "1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "registry: 60 requests" in out.stdout and "process events read" in out.stdout, out.stdout


@pytest.mark.timeout(120)
def test_quick_presence_benchmark_reports_frames_and_cpu(tmp_path: Path) -> None:
    """bench/presence.py (a reconnect burst against presence, in-process) runs and reports its figures."""
    out = tmp_path / "presence.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "presence.py"), "--quick", "--spread", "3", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=110,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    for scenario in ("reconnect", "join"):
        m = doc[scenario]["median"]
        assert 0 < m["frames"] < m["uncoalesced"] and m["cpu_ms"] > 0 and m["kv_writes"] > 0, (scenario, m)


@pytest.mark.timeout(120)
def test_quick_presence_kill_benchmark_reports_the_delay(tmp_path: Path) -> None:
    """bench/presence.py --kill (real processes: SIGKILL to the watchers' leave) runs and reports its figure."""
    out = tmp_path / "kill.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "presence.py"), "--kill", "--quick", "--kill-ttl", "1", "--json",
         str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=110,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (seconds,) = json.loads(out.read_text())["seconds"]
    assert seconds > 0


def test_deflate_benchmark_compares_plain_and_compressing_deliveries() -> None:
    """bench/deflate.py in its smallest form: both modes measured, the compressed frames smaller."""
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "deflate.py"), "--rounds", "1", "--repeat", "1",
         "--connections", "200", "--scopes", "10", "--flushes", "5"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines() if line.strip()}
    assert float(rows["compressing"][2]) < float(rows["plain"][2]), out.stdout  # bytes per delivery
    assert "compression:" in rows, out.stdout


@pytest.mark.timeout(180)
def test_handshake_benchmark_reports_both_algorithms(tmp_path: Path) -> None:
    """bench/handshakes.py in its quickest form: one round per algorithm, of enough connections (200) that
    their CPU is above the kernel's 10 ms accounting tick (40 could read as 0 CPU on a quiet machine)."""
    out = tmp_path / "hs.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "handshakes.py"), "--rounds", "1", "--connections", "200",
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=170,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert set(summary) == {"gateway RS256", "gateway ES256"}
    for row in summary.values():
        assert row["rounds"][0]["connected"] == 200 and row["per_core_s"] > 0


@pytest.mark.timeout(180)
def test_handshake_benchmark_deals_connections_over_load_processes(tmp_path: Path) -> None:
    """`--clients 2`: the connections of a round are dealt over two load processes (as a count near the
    per-process descriptor limit needs), all of them counted, with the gateway's own descriptors reported."""
    out = tmp_path / "hs2.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "handshakes.py"), "--rounds", "1", "--connections", "40", "--clients",
         "2", "--algs", "ES256", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=170,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ((rnd,),) = [row["rounds"] for row in json.loads(out.read_text()).values()]
    assert rnd["connected"] == 40 and rnd["open"] == 48  # and 4 warm-up connections per process
    assert 0 < rnd["server_own_fds"] < rnd["server_fds"] <= rnd["server_fd_limit"]
    assert "from 2 load process(es)" in proc.stdout and "one process holds at most" in proc.stdout


def test_idle_rss_benchmark_reports_the_window_empty_and_full(tmp_path: Path) -> None:
    """bench/idle_rss.py in its quickest form: one round, a small stream to read back."""
    out = tmp_path / "idle.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "idle_rss.py"), "--rounds", "1", "--fill", "2000", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=170,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert sorted(key.rsplit(", ", 1)[1] for key in summary) == ["window empty", "window full"]
    for row in summary.values():
        assert len(row["rounds_kib"]) == 1 and row["median_kib"]["VmRSS"] > 0


@pytest.mark.timeout(180)
def test_quick_benchmark_with_compressing_load_clients(tmp_path: Path) -> None:
    """`--compress`: the compiled clients offer permessage-deflate and count the (inflated) events. Without
    zlib's headers the client is built without it, and `--compress` says so instead of measuring."""
    out = tmp_path / "quick-z.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "fanout.py"), "--quick", "--compress", "--servers", "gateway",
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=170,
    )
    if not Path("/usr/include/zlib.h").exists():
        assert proc.returncode != 0 and "needs a build with zlib" in proc.stdout + proc.stderr
        return
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["summary"]["rows"]
    assert row["achieved"] > 0 and row["p99_ms"] > 0
    assert "offer permessage-deflate" in proc.stdout


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
