"""The TypeScript AG-UI bridge (clients/js/src/ag-ui.ts): `node --test clients/js/test/ag-ui.test.mjs` against a
real gateway (nats-server, test IdP): the shared vectors through the TS mapping and @ag-ui/client's own
verifier and state-applying pipeline, and GatewayAgent joining and dropping in the middle of a message."""

from __future__ import annotations

import re

from tests.support.gateway import RunningGateway
from tests.support.idp import TestIdP
from tests.support.jsclient import node_test
from tests.support.platform import Platform


async def test_the_typescript_bridge(gw: RunningGateway, idp: TestIdP, platform: Platform, nats_server: object) -> None:
    await platform.grant("acme.org", {"admins": ["user:alice"]})
    await platform.grant("acme.conversation.other", {"members": ["user:mia"]})
    await platform.applied(idp, gw)
    out = await node_test("ag-ui.test.mjs", {
        "GW_HTTP": gw.http, "NATS_URL": nats_server.url,  # type: ignore[attr-defined]
        "TOKEN_ALICE": idp.mint("alice"), "TOKEN_MIA": idp.mint("mia"),
    })
    # node_test fails on any failure; every test ran (none skipped or left out)
    assert re.search(r" pass 17\n", out) and re.search(r" fail 0\n", out), out[-3000:]
