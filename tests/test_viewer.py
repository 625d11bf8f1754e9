"""The live viewer at `/`: served by every gateway; driven in headless Chromium against `wsgateway dev`.

The browser test is the newcomer's path: `wsgateway dev` (here on free ports, with faster simulated
traffic), the page, a demo user. It checks what a person would see: events render for an allowed
user and never for a denied one, the drop button loses nothing (the page's seqs equal what
GET /v1/history holds for the same range), a live revocation shows `revoked` and a grant restarts
the scope, a panel shows who else watches it (presence), the demo switch is never offered on a forbidden
panel, banners show protocol names as code
(no literal backticks), and at phone width (390 px) nothing is wider than the screen. Chromium is
Debian's `chromium`, driven by npm `playwright-core` from tools/ (tests/support/browser.py); both are
installed here when missing.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support.browser import ensure_browser, run_driver
from tests.support.gateway import RunningGateway
from tests.support.ports import free_port
from tests.support.wait import eventually_sync

WSGATEWAY = str(Path(sys.executable).parent / "wsgateway")
PACE = "0.3"  # simulator pauses x0.3: plenty of traffic within seconds


# --- served by every gateway ---------------------------------------------------------------------


async def test_viewer_page_and_assets_are_served_self_contained(gw: RunningGateway) -> None:
    async with httpx.AsyncClient(base_url=gw.http) as c:
        page = await c.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "/static/viewer.js" in page.text and "/static/viewer.css" in page.text
        assert "http://" not in page.text and "https://" not in page.text  # no CDN, no web fonts
        js = await c.get("/static/viewer.js")
        assert js.status_code == 200 and "javascript" in js.headers["content-type"]
        assert 'import("/static/sdk/index.js")' in js.text  # the connection is the SDK's (clients/js, built)
        sdk = await c.get("/static/sdk/client.js")
        assert sdk.status_code == 200 and "javascript" in sdk.headers["content-type"]
        assert "[SUBPROTOCOL, `bearer.${token}`]" in sdk.text  # the token travels as a subprotocol
        assert '"wsgateway.v1"' in (await c.get("/static/sdk/generated/constants.js")).text
        assert "innerHTML" not in js.text and "insertAdjacentHTML" not in js.text  # event text stays text
        css = await c.get("/static/viewer.css")
        assert css.status_code == 200 and "url(" not in css.text and "@import" not in css.text
        assert (await c.get("/dev/demo")).status_code == 404  # dev-only routes exist only in `wsgateway dev`
        assert (await c.post("/dev/demo/access", json={"scope": "conversation:welcome", "grant": False})
                ).status_code in (404, 405)


# --- headless Chromium against `wsgateway dev` -----------------------------------------------------


def _wait_ready(proc: subprocess.Popen[bytes], base: str, log: Path, timeout: float = 40) -> None:
    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"`wsgateway dev` exited with {proc.returncode}:\n{log.read_text()}")
        return httpx.get(f"{base}/readyz", timeout=2).status_code == 200

    eventually_sync(ready, what="`wsgateway dev` to answer /readyz 200", timeout=timeout, interval=0.1,
                    ignore=(httpx.HTTPError,))


def _history_seqs(base: str, token: str, scopes: list[str], after: int, upto: int) -> list[int]:
    """Every retained event of `scopes` with after < seq <= upto, through GET /v1/history."""
    seqs: list[int] = []
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=10) as c:
        for scope in scopes:
            cursor = after
            while cursor < upto:
                body = c.get("/v1/history", params={"scope": scope, "after": cursor, "limit": 1000}).json()
                if not body["events"]:
                    break
                seqs += [e["seq"] for e in body["events"] if e["seq"] <= upto]
                cursor = body["next_after"]
    return sorted(seqs)


@pytest.mark.timeout(120)
def test_viewer_in_headless_chromium(tmp_path: Path) -> None:
    ensure_browser()
    port, nats_port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "dev.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [WSGATEWAY, "dev", "--port", str(port), "--nats-port", str(nats_port), "--pace", PACE],
            stdout=sink, stderr=subprocess.STDOUT,
        )
    try:
        _wait_ready(proc, base, log)
        assert f"live viewer    {base}/" in log.read_text()  # the banner names the page
        shot = tmp_path / "viewer.png"
        phone = tmp_path / "phone.png"
        config = {"url": f"{base}/", "mode": "check", "out": str(shot), "revokedOut": str(tmp_path / "revoked.png"),
                  "phoneOut": str(phone)}
        out = run_driver("viewer.mjs", config, tmp_path)
        assert out["problems"] == [], out["problems"]  # no script errors, no failed requests

        # carol (group support): her conversation streams; conversation:welcome is forbidden and stays empty
        carol = out["carol"]["scopes"]
        assert set(carol) == {"conversation:support", "conversation:welcome"}
        assert carol["conversation:support"]["status"] == "live" and carol["conversation:support"]["events"] >= 5
        assert carol["conversation:welcome"] == {"status": "forbidden", "events": 0, "via": "followed"}
        assert "forbidden" in out["carol"]["banner"] and out["carol"]["welcome_panel_events"] == "0"
        # no demo switch on the forbidden panel (it would restrict the scope for everyone else) ...
        assert out["carol"]["welcome_panel"]["buttons"] == []
        assert out["carol"]["support_panel"]["buttons"] == ["revoke access"]  # ... but on hers, live
        assert out["carol"]["welcome_panel"]["banner_code"] == ["forbidden"]  # a <code> element
        assert out["carol"]["inbox"] == [] and out["carol"]["inbox_badge"] == "0"  # nobody asks her anything

        # bob (group apollo-team): answers assemble chunk by chunk in his conversation
        bob = out["bob"]
        assert set(bob["scopes"]) == {"conversation:welcome", "process:onboarding", "agent:researcher"}
        assert all(s["status"] == "live" and s["events"] > 0 for s in bob["scopes"].values())
        assert len(out["bob_answer"]) > 20

        # drop and resume: one resume, recovered, the gap replayed; no duplicate, no gap against history
        [resume] = bob["resumes"]
        assert bob["drops"] == 1 and resume["recovered"] is True and resume["replayed"] > 0
        assert resume["since"] < resume["seq"] < bob["lastSeq"]
        assert "nothing lost" in bob["resume_note"]
        seqs = bob["seqs"]
        assert bob["duplicates"] == 0 and seqs == sorted(set(seqs))
        assert any(resume["since"] < s <= resume["seq"] for s in seqs)  # events published while dropped
        bob_token = httpx.get(f"{base}/dev/idp/token", params={"sub": "bob", "groups": "apollo-team"})
        token = bob_token.json()["access_token"]
        expected = _history_seqs(base, token, sorted(bob["scopes"]), bob["startSeq"], bob["lastSeq"])
        assert seqs == expected, f"page {len(seqs)} events vs history {len(expected)}"

        # bob's inbox: the request asked of his group appears, then leaves when answered; alice's never shows
        inbox = out["bob_inbox"]
        [verify] = [q for q in inbox["asked"] if q["request_id"].startswith("verify-")]
        assert verify["scope"] == "process:onboarding" and "ID documents" in inbox["item"]
        assert inbox["badge"] == str(len(inbox["asked"])) != "0"
        assert not any(q["request_id"].startswith("approve-") for q in inbox["asked"] + inbox["answered"])
        assert verify not in inbox["answered"]
        # presence: bob's panel lists who else watches it (alice, on another socket), then that she left
        presence = out["presence"]
        assert {"user:alice", "user:bob"} <= set(presence["model"]["members"]) and presence["model"]["count"] >= 2
        assert "watching: " in presence["text"] and "alice" in presence["text"] and "bob" not in presence["text"]
        assert "alice" not in presence["after"]

        # live revocation, then the grant back
        revoke = out["revoke"]
        assert revoke["banner"].startswith("revoked frame: access to conversation:welcome was removed")
        assert revoke["panel"]["banner_code"] == ["revoked"] and revoke["panel"]["buttons"] == ["grant back"]
        assert "revoked conversation:welcome" in revoke["log"]
        assert revoke["events_after_wait"] == revoke["events_at_revoke"]  # nothing more for the revoked scope
        assert "subscribed frame" in out["grant"]["banner"] and out["grant"]["events"] > revoke["events_after_wait"]
        assert out["grant"]["panel"]["banner_code"] == ["subscribed"]
        assert out["grant"]["panel"]["buttons"] == ["revoke access"]
        for banner in (out["carol"]["banner"], revoke["banner"], out["grant"]["banner"]):
            assert "`" not in banner, banner  # protocol names are <code>, not markdown

        # phone width: one column, nothing wider than the screen (the page, a panel, a panel's feed)
        layout = out["phone"]
        assert layout["innerWidth"] == 390
        assert layout["scrollWidth"] <= layout["innerWidth"], layout
        assert layout["panelsRight"] <= layout["innerWidth"] and layout["wideFeeds"] == [], layout
        assert phone.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        # the demo switch takes only JSON naming a demo scope
        bad = [httpx.post(f"{base}/dev/demo/access", content=b"scope=conversation:welcome&grant=false",
                          headers={"Content-Type": "application/x-www-form-urlencoded"}),
               httpx.post(f"{base}/dev/demo/access", json={"scope": "conversation:other", "grant": False}),
               httpx.post(f"{base}/dev/demo/access", json={"scope": "conversation:welcome", "grant": "no"})]
        assert [r.status_code for r in bad] == [400, 400, 400]
        assert httpx.get(f"{base}/dev/demo").json()["restricted"] == []  # granted back by the page
        assert "WARNING gateway.devtools.simulator" not in log.read_text()  # every simulated event was valid

        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
