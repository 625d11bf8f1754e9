#!/usr/bin/env python3
"""Regenerate the README's screenshot of the live viewer (docs/images/viewer.png).

Starts `wsgateway dev` on free ports (simulated traffic at its normal pace), opens the viewer in
headless Debian Chromium (tests/browser/viewer.mjs, npm playwright-core from tools/), picks a demo
user (alice: every scope), lets traffic flow, presses "Drop connection & resume", waits for the
resume and writes the PNG. Installs chromium/node/npm and the npm tools first when missing.

Usage: .venv/bin/python scripts/viewer_screenshot.py [OUT.png] [--user alice|bob|carol]
           [--width 1440] [--height 900] [--full-page]

Phone width, the whole page: `scripts/viewer_screenshot.py /tmp/phone.png --width 390 --height 844 --full-page`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=str(REPO / "docs" / "images" / "viewer.png"))
    parser.add_argument("--user", default="alice")
    parser.add_argument("--wait-ms", type=int, default=6000, help="traffic to watch before the drop")
    parser.add_argument("--width", type=int, default=1440, help="viewport width, CSS pixels (phone: 390)")
    parser.add_argument("--height", type=int, default=900, help="viewport height, CSS pixels")
    parser.add_argument("--full-page", action="store_true", help="the whole scrolled page, not just the viewport")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)

    subprocess.run(["bash", str(REPO / "scripts" / "ensure-apt.sh"), "chromium=chromium", "node=nodejs", "npm=npm"],
                   check=True)
    subprocess.run(["bash", str(REPO / "scripts" / "ensure-npm.sh")], check=True)

    port, nats_port = _free_port(), _free_port()
    base = f"http://127.0.0.1:{port}"
    wsgateway = Path(sys.executable).parent / "wsgateway"
    with tempfile.TemporaryDirectory(prefix="wsgateway-shot-") as tmp:
        log = Path(tmp) / "dev.log"
        with log.open("wb") as sink:
            dev = subprocess.Popen([str(wsgateway), "dev", "--port", str(port), "--nats-port", str(nats_port)],
                                   stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 40
            while True:
                try:
                    if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if dev.poll() is not None or time.monotonic() > deadline:
                    print(f"`wsgateway dev` did not come up:\n{log.read_text()}", file=sys.stderr)
                    return 1
                time.sleep(0.1)
            config = {"url": f"{base}/", "mode": "shot", "out": str(out), "user": args.user, "waitMs": args.wait_ms,
                      "width": args.width, "height": args.height, "fullPage": args.full_page}
            run = subprocess.run(["node", str(REPO / "tests" / "browser" / "viewer.mjs"), json.dumps(config)],
                                 capture_output=True, text=True, timeout=120, check=False,
                                 env={**os.environ, "TMPDIR": tmp})
            print(run.stdout.strip() or run.stderr, file=sys.stderr)
            if run.returncode != 0:
                return 1
        finally:
            dev.send_signal(signal.SIGINT)
            try:
                dev.wait(20)
            except subprocess.TimeoutExpired:
                dev.kill()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
