"""One source for each rule: the places that check a scope, an id or a subject prefix agree on every
input, including the ones two copies of a rule used to disagree on (a trailing newline, a tab)."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest
from pydantic import ValidationError

from gateway.config import Settings
from gateway.core.presence import parse_kv_key
from gateway.events import KINDS, Envelope, check_prefix
from gateway.metrics import KIND_LABELS
from gateway.permissions import OrgAcl, ResourceAcl, parse_doc
from gateway.protocol import ERR_BAD_REQUEST, FrameError, Subscribe, Unsubscribe, is_scope, parse_client_frame
from wsgateway_operator.spec import NatsSpec

SCOPES_OK = ["*", "conversation:c1", "process:p-7", "agent:" + "a" * 128, "conversation:A_z-0"]
SCOPES_BAD = [
    "conversation:c1\n", "conversation:c1\r\n", "\nconversation:c1", "conversation:c1 ", " conversation:c1",
    "x conversation:c1", "conversation:c1 x", "conversation:", "thread:c1", "conversation:c.1", "**", "*\n",
    "agent:" + "a" * 129, "conversation:c1:x", "",
]
PREFIXES_OK = ["events", "acme.prod.events", "a-b_c.d"]
PREFIXES_BAD = ["", "ev ents", "ev\tents", "events\n", "ev\rents", "events.", ".events", "a..b", "events.*", "events.>",
                "ev*", "ev>"]


@pytest.mark.parametrize("scope", SCOPES_OK)
def test_good_scopes_pass_every_check(scope: str) -> None:
    assert is_scope(scope)
    for op in ("subscribe", "unsubscribe"):
        frame = parse_client_frame(orjson.dumps({"op": op, "scope": scope}))
        assert isinstance(frame, Subscribe | Unsubscribe) and frame.scope == scope


@pytest.mark.parametrize("scope", SCOPES_BAD)
def test_bad_scopes_fail_every_check(scope: str) -> None:
    assert not is_scope(scope)
    for op in ("subscribe", "unsubscribe"):
        with pytest.raises(FrameError) as err:
            parse_client_frame(orjson.dumps({"op": op, "scope": scope}))
        assert err.value.code == ERR_BAD_REQUEST
    if scope != "*":
        with pytest.raises(ValidationError):
            Envelope.model_validate({"id": "e1", "type": "run.started", "tenant": "t", "scope": scope,
                                     "time": "2025-06-01T10:00:00Z"})


@pytest.mark.parametrize("prefix", PREFIXES_OK + PREFIXES_BAD)
def test_config_publisher_and_operator_agree_on_subject_prefixes(prefix: str) -> None:
    good = prefix in PREFIXES_OK
    outcomes = []
    for check in (
        lambda: check_prefix(prefix),  # the Publisher and subject_for
        lambda: Settings(dev_mode=True, subject_prefix=prefix),  # the gateway's WSGATEWAY_SUBJECT_PREFIX
        # the operator's spec.nats.subjectPrefix (its CRD pattern is the same string)
        lambda: NatsSpec.model_validate({"urls": ["nats://n:4222"], "subjectPrefix": prefix}),
    ):
        try:
            check()
            outcomes.append(True)
        except ValueError:  # pydantic's ValidationError is a ValueError
            outcomes.append(False)
    assert outcomes == [good, good, good]


def test_the_three_kinds_are_the_same_everywhere() -> None:
    assert KINDS == ("conversation", "process", "agent")
    assert KIND_LABELS == KINDS
    for kind in KINDS:
        assert isinstance(parse_doc(f"t.{kind}.x1", b'{"members": ["u1"]}'), ResourceAcl)
        assert is_scope(f"{kind}:x1")
    assert parse_doc("t.thread.x1", b'{"members": ["u1"]}') is None
    # the presence bucket's keys (m.<instance>.<tenant>.<kind>.<id>): the same kinds and the same id rule
    instance = "0" * 32
    for kind in KINDS:
        assert parse_kv_key(f"m.{instance}.t.{kind}.x1") == (instance, ("t", f"{kind}:x1"))
    for key in ("t.thread.x1", "t.conversation." + "a" * 129, "t.conversation.c1\n", "t\n.conversation.c1"):
        assert parse_kv_key(f"m.{instance}.{key}") is None, key


def test_acl_principal_lists_are_sets_of_ids() -> None:
    doc = parse_doc("t.conversation.c1", b'{"members": ["u1", "group:g", "u1"], "project": "p1"}')
    assert isinstance(doc, ResourceAcl) and doc.members == frozenset({"user:u1", "group:g"})
    assert OrgAcl().admins == frozenset()
    for body in (b'{"members": "u1"}', b'{"members": {"u1": true}}', b'{"members": [1]}', b'{"members": [""]}',
                 b'{"project": "p1\\n"}'):
        assert parse_doc("t.conversation.c1", body) is None, body


def test_the_data_path_imports_no_jwt_or_http_client_library() -> None:
    """`Principal` is a leaf module: the fan-out core (bus, hub and its parts, replay) loads without
    gateway.auth and the JWT and HTTP client libraries it uses (checked in a fresh interpreter)."""
    core = ["bus", "hub", "index", "queue", "writer", "expiry", "connection", "channel", "replay", "window"]
    code = "; ".join([*(f"import gateway.core.{m}" for m in core), "import sys",
                      "print(sorted(m for m in ('gateway.auth', 'jwt', 'httpx') if m in sys.modules))"])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_json_that_is_kept_takes_its_own_size() -> None:
    """orjson's result keeps the 4 KiB buffer it wrote into; what the gateway keeps (a presence member's row,
    a queued control frame, a merged delta) is copied to its size (`protocol.kept_json`). A presence row per
    member cost 4 KiB per connection before (bench/fanout.py: 12.5 KiB per idle connection instead of 10.5)."""
    import tracemalloc

    from gateway.core.presence import Member, member_row
    from gateway.protocol import kept_json, server_payload

    makers = {
        "kept_json": lambda i: kept_json({"type": "x", "i": i}),
        "member_row": lambda i: member_row(f"user:u{i}", Member(None, None), 1),
        "server_payload": lambda i: server_payload("subscribed", id=i, scope="conversation:c1", seq=i),
    }
    for name, make in makers.items():
        tracemalloc.start()
        try:
            kept = [make(i) for i in range(500)]
            per = tracemalloc.get_traced_memory()[0] / len(kept)
        finally:
            tracemalloc.stop()
        assert per < 256, f"{name}: {per:.0f} bytes per result kept"
    assert kept_json([1, "a", None]) == orjson.dumps([1, "a", None])
