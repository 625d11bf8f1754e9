"""The peer comparison must keep working: bench/fanout.py measures the gateway beside Nchan and Centrifugo
(memory engine and NATS broker, GOMAXPROCS=1 and default) and the naive app, in its quickest form, and
reports figures for every one of them. Nothing here asserts a speed: the figures only have to exist."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
KINDS = ["gateway", "nchan", "centrifugo1", "centrifugo", "centrifugo1-nats", "centrifugo-nats", "naive"]


@pytest.mark.timeout(600)
def test_quick_peer_comparison_reports_every_server(tmp_path: Path) -> None:
    out = tmp_path / "peers.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "fanout.py"), "--quick", "--servers", ",".join(KINDS), "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=590,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    report = doc["summary"]["peers"]
    (count,) = report["per_count"]
    assert count["connections"] == 300
    assert list(count["servers"]) == KINDS
    for kind, srv in count["servers"].items():
        figures = {key: fig["median"] for key, fig in srv["figures"].items()}
        # Events really reached the clients, and every figure that does not depend on speed is there.
        assert figures["max_throughput"] > 0, kind
        assert figures["max_throughput_p99_ms"] > 0, kind
        assert figures["cpu_s_per_1m"] > 0, kind
        assert figures["rss_kib_per_conn"] > 0, kind
        assert figures["base_rss_mib"] > 0, kind
        assert all(s["achieved"] > 0 and s["other_cpu"] >= 0 for s in srv["steps"]), kind
    # The gateway, the naive app and Centrifugo's NATS broker go through the benchmark's nats-server.
    for kind in ("gateway", "centrifugo1-nats", "centrifugo-nats", "naive"):
        assert count["servers"][kind]["figures"]["nats_cpu_s_per_1m"]["median"] > 0, kind
    for peer in ("nchan", "centrifugo1", "centrifugo", "centrifugo1-nats", "centrifugo-nats"):
        ratios = count["ratios"][peer]
        assert ratios["max_throughput"] > 0 and ratios["cpu_s_per_1m"] > 0 and ratios["rss_kib_per_conn"] > 0, peer
    assert [t["connections"] for t in report["targets"]] == [300]  # the ratio targets are at 1k / 5k only
    assert "## Peer comparison" in proc.stdout and "### Targets (issue 13)" in proc.stdout
    assert "gw / Nchan" in proc.stdout and "gw / Centrifugo GOMAXPROCS=1" in proc.stdout
    # bench/peerreport.py prints the same report again from the saved JSON.
    again = subprocess.run([sys.executable, str(BENCH / "peerreport.py"), str(out)], capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 0, again.stderr
    printed = set(proc.stdout.splitlines())
    assert "## Peer comparison" in again.stdout
    assert [line for line in again.stdout.splitlines() if line not in printed] == []


def test_generated_nchan_config_is_accepted_by_nginx(tmp_path: Path) -> None:
    """The nginx config bench/peers.py writes passes `nginx -t` with Debian's nchan module."""
    sys.path.insert(0, str(BENCH))
    try:
        import peers
    finally:
        sys.path.remove(str(BENCH))
    spec = peers.nchan_spec(tmp_path, peers.free_port())
    proc = subprocess.run([*spec.cmd, "-t"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "test is successful" in proc.stderr
    conf = Path(spec.cmd[spec.cmd.index("-c") + 1]).read_text()
    assert "master_process off;" in conf and "nchan_subscriber websocket;" in conf and "nchan_publisher http;" in conf


@pytest.mark.timeout(600)
def test_quick_deflate_comparison_compresses_on_both_servers(tmp_path: Path) -> None:
    """bench/deflatepeer.py in its quickest form: the gateway and Centrifugo, each with clients that offer
    permessage-deflate and clients that do not. Both negotiate it when offered (and only then), the
    compressed frames really are compressed (RSV1) and smaller on the wire, and the figures exist."""
    out = tmp_path / "deflate.json"
    proc = subprocess.run([sys.executable, str(BENCH / "deflatepeer.py"), "--quick", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=590)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    groups = {(g["server"], g["mode"]): g for g in json.loads(out.read_text())["summary"]["groups"]}
    assert set(groups) == {(s, m) for s in ("gateway", "centrifugo1") for m in ("plain", "deflate")}
    for server in ("gateway", "centrifugo1"):
        plain, deflate = groups[(server, "plain")], groups[(server, "deflate")]
        assert list(plain["negotiated"]) == [""], server  # no offer, no extension
        (answer,) = deflate["negotiated"]
        assert answer.startswith("permessage-deflate") and "server_no_context_takeover" in answer, server
        assert plain["median"]["compressed_pct"] == 0, server
        assert deflate["median"]["compressed_pct"] > 0, server
        assert 0 < deflate["median"]["wire_b"] < plain["median"]["wire_b"], server
        # inflated, the compressed mode's events are as long as the plain ones (same envelopes)
        assert deflate["median"]["payload_b"] > deflate["median"]["wire_b"], server
        for g in (plain, deflate):
            # the whole step's CPU per delivery needs no timing (the window's is left out when the driver was late)
            assert g["median"]["achieved"] > 0 and g["median"]["step_cpu_us"] > 0, server
    assert "## permessage-deflate, gateway beside Centrifugo" in proc.stdout
    assert "WARNING" not in proc.stdout
