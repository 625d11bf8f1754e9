"""The event contract: subject scheme, JSON envelope, typed catalogue and delivery classes.

Every platform service publishes events to ``<prefix>.<tenant>.<kind>.<resource_id>`` with a JSON
envelope; the gateway validates each one with :func:`parse_event` before it may reach a browser, and
the :class:`~gateway.sdk.publisher.Publisher` runs the very same check before it publishes, so a
publisher cannot produce an event the gateway would reject. ``docs/events.md`` is the human-readable
catalogue; ``tests/test_events.py`` keeps it and this module in step.

:func:`parse_event` runs once per event on the gateway's hot path, so the checks here are plain
pydantic-core validation plus a few string operations: no per-event regex compilation, no copies
of the payload, and the validated data model is thrown away (the raw bytes are what gets forwarded).
"""

from __future__ import annotations

import re
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

if TYPE_CHECKING:
    from pydantic.plugin._schema_validator import PluggableSchemaValidator
    from pydantic_core import SchemaValidator

# The rules below are the only definitions: protocol, permissions, metrics, config, auth, the dev tools
# and the operator's CRD all build on them.
#
# The three kinds of scope (and the subject token between tenant and id).
KINDS: Final = ("conversation", "process", "agent")
# A tenant, project or resource id (without anchors, to build larger patterns from).
NAME_BODY: Final = r"[A-Za-z0-9_-]{1,128}"
# ``<kind>:<id>`` (without anchors).
SCOPE_BODY: Final = rf"(?:{'|'.join(KINDS)}):{NAME_BODY}"
# The ``*_PATTERN`` strings are for pydantic fields (and JSON schema): pydantic searches a pattern, so
# it is anchored, and its Rust regex reads ``$`` as the end of the text ("c1\n" does not match).
NAME_PATTERN: Final = rf"^{NAME_BODY}$"
SCOPE_PATTERN: Final = rf"^{SCOPE_BODY}$"
# For Python code: ``\Z``, not ``$``, because Python's ``$`` also matches before a trailing newline,
# and a newline must never reach a subject.
NAME_RE: Final = re.compile(rf"^{NAME_BODY}\Z")
# A subject prefix: dot-separated tokens without whitespace or wildcards (NATS subject syntax).
SUBJECT_PREFIX_PATTERN: Final = r"^[^\s.*>]+(\.[^\s.*>]+)*$"
_SUBJECT_PREFIX_RE: Final = re.compile(SUBJECT_PREFIX_PATTERN)  # used with fullmatch
# Event ids travel in the Nats-Msg-Id header too, so no whitespace or control characters.
EVENT_ID_PATTERN: Final = r"^[\x21-\x7e]{1,128}$"
# Dot-separated tokens; unknown types must still look like types so they are safe in logs and labels.
TYPE_PATTERN: Final = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$"

InvalidReason = Literal["json", "envelope", "subject", "scope_mismatch", "tenant_mismatch", "data"]
DeliveryClass = Literal["lifecycle", "delta", "snapshot", "state_delta", "other"]


class InvalidEvent(ValueError):
    """An event the gateway must not deliver.

    ``reason`` is one of a fixed set (it is the ``reason`` label of
    ``wsgateway_events_invalid_total``); ``message`` is for logs and for the publisher's caller.
    It subclasses :class:`ValueError` so the publisher can raise it directly as "bad input".
    """

    REASONS: Final = ("json", "envelope", "subject", "scope_mismatch", "tenant_mismatch", "data")

    def __init__(self, reason: InvalidReason, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason: InvalidReason = reason
        self.message = message


# --------------------------------------------------------------------------------------------------
# Envelope
# --------------------------------------------------------------------------------------------------


class Envelope(BaseModel):
    """The JSON body of every event.

    Unknown top-level fields are ignored rather than rejected: the gateway forwards the raw bytes,
    so a newer publisher may add envelope fields without breaking older gateways.
    """

    model_config = ConfigDict(extra="ignore")

    id: Annotated[str, Field(pattern=EVENT_ID_PATTERN)]
    type: Annotated[str, Field(max_length=128, pattern=TYPE_PATTERN)]
    tenant: Annotated[str, Field(pattern=NAME_PATTERN)]
    scope: Annotated[str, Field(pattern=SCOPE_PATTERN)]
    time: AwareDatetime
    actor: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    run_id: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    trace: dict[str, str] | None = None
    data: dict[str, Any] = Field(default_factory=dict)

    @field_validator("time", mode="before")
    @classmethod
    def _rfc3339_only(cls, v: Any) -> Any:
        # pydantic would read a bare number as a Unix timestamp; the contract is an RFC 3339 string.
        if isinstance(v, str | datetime):
            return v
        raise ValueError("time must be an RFC 3339 timestamp string with a timezone")

    @property
    def kind(self) -> str:
        """``conversation``, ``process`` or ``agent``: the first half of the scope."""
        return self.scope.partition(":")[0]

    @property
    def resource_id(self) -> str:
        """The id of the conversation, process or agent the event belongs to."""
        return self.scope.partition(":")[2]

    @property
    def timestamp(self) -> float:
        """Publisher's ``time`` as epoch seconds, for end-to-end latency measurement."""
        return self.time.timestamp()


# --------------------------------------------------------------------------------------------------
# Data models
# --------------------------------------------------------------------------------------------------

Ident = Annotated[str, StringConstraints(min_length=1, max_length=256)]
Role = Literal["assistant", "user", "system", "developer", "tool"]


class EventData(BaseModel):
    """Base of all data models: extra fields are allowed so publishers can add fields before the
    catalogue learns about them, and ids may be given by field name or alias."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)


class TokenUsage(EventData):
    """Token accounting of a run (OpenAI ``usage``-like)."""

    input_tokens: int | None = Field(None, ge=0)
    output_tokens: int | None = Field(None, ge=0)
    total_tokens: int | None = Field(None, ge=0)


# ---- agent runs ----------------------------------------------------------------------------------


class RunStarted(EventData):
    """``run.started``: an agent run began (the envelope's ``run_id`` names it)."""

    agent_id: Ident | None = None
    parent_run_id: Ident | None = None
    input: Any = None


class RunFinished(EventData):
    """``run.finished``: the run ended; ``outcome`` says how (AG-UI's RUN_FINISHED and RUN_ERROR)."""

    outcome: Literal["success", "error", "cancelled", "interrupted"]
    error: str | None = None
    result: Any = None
    usage: TokenUsage | None = None


class RunStepStarted(EventData):
    """``run.step.started``: a named step (node, sub-agent, phase) of a run began."""

    step_id: Ident
    name: Annotated[str, StringConstraints(min_length=1)]


class RunStepFinished(EventData):
    """``run.step.finished``: the step named by ``step_id`` ended."""

    step_id: Ident
    name: Annotated[str, StringConstraints(min_length=1)]


class ReasoningStarted(EventData):
    """``run.reasoning.started``: a reasoning ("thinking") stream opens."""

    message_id: Ident


class ReasoningDelta(EventData):
    """``run.reasoning.delta``: the next chunk of reasoning text."""

    message_id: Ident
    delta: str


class ReasoningFinished(EventData):
    """``run.reasoning.finished``: the reasoning stream closed; ``content`` may repeat the whole text."""

    message_id: Ident
    content: str | None = None


class MessageStarted(EventData):
    """``run.message.started``: a message being generated by the run opens."""

    message_id: Ident
    role: Role = "assistant"


class MessageDelta(EventData):
    """``run.message.delta``: the next chunk of a message's text."""

    message_id: Ident
    delta: str


class MessageFinished(EventData):
    """``run.message.finished``: the message is complete; ``content`` may repeat the whole text so a
    client that missed deltas can repair its copy (OpenAI's ``output_text.done``)."""

    message_id: Ident
    content: str | None = None


class ToolCallStarted(EventData):
    """``run.tool_call.started``: the model began a tool call (``message_id``: the message it belongs to)."""

    tool_call_id: Ident
    name: Annotated[str, StringConstraints(min_length=1)]
    message_id: Ident | None = None


class ToolCallArgsDelta(EventData):
    """``run.tool_call.args.delta``: the next chunk of the tool call's JSON arguments text."""

    tool_call_id: Ident
    delta: str


class ToolCallArgsFinished(EventData):
    """``run.tool_call.args.finished``: arguments are complete and the tool is about to run (AG-UI's
    TOOL_CALL_END); ``arguments`` may repeat the whole arguments text."""

    tool_call_id: Ident
    arguments: str | None = None


class ToolCallFinished(EventData):
    """``run.tool_call.finished``: the tool returned ``result`` (AG-UI's TOOL_CALL_RESULT)."""

    tool_call_id: Ident
    result: Any = None


class ToolCallError(EventData):
    """``run.tool_call.error``: the tool call failed."""

    tool_call_id: Ident
    error: Annotated[str, StringConstraints(min_length=1)]


class StateSnapshot(EventData):
    """``run.state.snapshot``: the run's complete shared state; supersedes earlier snapshots/deltas."""

    state: dict[str, Any]


JsonPointer = Annotated[str, StringConstraints(pattern=r"^(/([^~/]|~[01])*)*$")]


class _PatchOp(BaseModel):
    # RFC 6902 says members other than the op's own are ignored, so keep them (forward compatible).
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class PatchAdd(_PatchOp):
    op: Literal["add"]
    path: JsonPointer
    value: Any


class PatchRemove(_PatchOp):
    op: Literal["remove"]
    path: JsonPointer


class PatchReplace(_PatchOp):
    op: Literal["replace"]
    path: JsonPointer
    value: Any


class PatchMove(_PatchOp):
    op: Literal["move"]
    from_: JsonPointer = Field(alias="from")
    path: JsonPointer


class PatchCopy(_PatchOp):
    op: Literal["copy"]
    from_: JsonPointer = Field(alias="from")
    path: JsonPointer


class PatchTest(_PatchOp):
    op: Literal["test"]
    path: JsonPointer
    value: Any


PatchOp = Annotated[
    PatchAdd | PatchRemove | PatchReplace | PatchMove | PatchCopy | PatchTest, Field(discriminator="op")
]


class StateDelta(EventData):
    """``run.state.delta``: an RFC 6902 JSON Patch to apply, in order, to the last state."""

    patch: list[PatchOp]


class MessagesSnapshot(EventData):
    """``run.messages.snapshot``: the full message list of the run so far (AG-UI's MESSAGES_SNAPSHOT)."""

    messages: list[dict[str, Any]]


# ---- conversations -------------------------------------------------------------------------------

MessageContent = str | list[dict[str, Any]]


class ConversationMessageCreated(EventData):
    """``conversation.message.created``: a message was added to the conversation's history."""

    message_id: Ident
    role: Role
    content: MessageContent
    author_id: Ident | None = None
    reply_to: Ident | None = None


class ConversationMessageUpdated(EventData):
    """``conversation.message.updated``: a stored message was edited."""

    message_id: Ident
    content: MessageContent


class ConversationMessageDeleted(EventData):
    """``conversation.message.deleted``: a stored message was removed."""

    message_id: Ident


class ParticipantJoined(EventData):
    """``conversation.participant.joined``: a user, agent or service joined the conversation."""

    participant_id: Ident
    participant_type: Literal["user", "agent", "service"] = "user"
    role: str | None = None


class ParticipantLeft(EventData):
    """``conversation.participant.left``: a participant left or was removed."""

    participant_id: Ident
    reason: str | None = None


class ConversationMetadataUpdated(EventData):
    """``conversation.metadata.updated``: ``metadata`` holds the changed keys and their new values."""

    metadata: dict[str, Any]


# ---- processes -----------------------------------------------------------------------------------


class ProcessStarted(EventData):
    """``process.started``: a long-running business process began."""

    name: Annotated[str, StringConstraints(min_length=1)]
    definition_id: Ident | None = None
    stages: list[str] | None = None
    input: Any = None


class ProcessStageChanged(EventData):
    """``process.stage_changed``: the process moved to ``stage``, number ``index`` (0-based) of ``total``."""

    stage: Annotated[str, StringConstraints(min_length=1)]
    index: int = Field(ge=0)
    total: int = Field(ge=1)
    previous_stage: str | None = None

    @model_validator(mode="after")
    def _index_in_range(self) -> ProcessStageChanged:
        if self.index >= self.total:
            raise ValueError("index must be less than total")
        return self


class ProcessProgress(EventData):
    """``process.progress``: ``fraction`` done (0..1) and/or a human-readable ``message``."""

    fraction: float | None = Field(None, ge=0.0, le=1.0)
    message: str | None = None

    @model_validator(mode="after")
    def _something_said(self) -> ProcessProgress:
        if self.fraction is None and self.message is None:
            raise ValueError("progress needs a fraction or a message")
        return self


class ProcessInputRequired(EventData):
    """``process.input_required``: the process waits for a human (human-in-the-loop)."""

    request_id: Ident
    prompt: Annotated[str, StringConstraints(min_length=1)]
    assignees: list[Ident] = Field(default_factory=list)
    expires_at: AwareDatetime | None = None
    input_schema: dict[str, Any] | None = None


class ProcessInputReceived(EventData):
    """``process.input_received``: the request ``request_id`` was answered by ``by``."""

    request_id: Ident
    by: Ident
    value: Any = None


class ProcessCompleted(EventData):
    """``process.completed``: the process ended successfully."""

    result: Any = None


class ProcessFailed(EventData):
    """``process.failed``: the process ended with an error."""

    error: Annotated[str, StringConstraints(min_length=1)]
    stage: str | None = None


class ProcessCancelled(EventData):
    """``process.cancelled``: the process was stopped before completing."""

    reason: str | None = None
    by: Ident | None = None


# --------------------------------------------------------------------------------------------------
# Catalogue
# --------------------------------------------------------------------------------------------------

# type -> (data model, delivery class, kind the scope must have or None for any)
_CATALOGUE: Final[dict[str, tuple[type[BaseModel], DeliveryClass, str | None]]] = {
    "run.started": (RunStarted, "lifecycle", None),
    "run.finished": (RunFinished, "lifecycle", None),
    "run.step.started": (RunStepStarted, "lifecycle", None),
    "run.step.finished": (RunStepFinished, "lifecycle", None),
    "run.reasoning.started": (ReasoningStarted, "lifecycle", None),
    "run.reasoning.delta": (ReasoningDelta, "delta", None),
    "run.reasoning.finished": (ReasoningFinished, "lifecycle", None),
    "run.message.started": (MessageStarted, "lifecycle", None),
    "run.message.delta": (MessageDelta, "delta", None),
    "run.message.finished": (MessageFinished, "lifecycle", None),
    "run.tool_call.started": (ToolCallStarted, "lifecycle", None),
    "run.tool_call.args.delta": (ToolCallArgsDelta, "delta", None),
    "run.tool_call.args.finished": (ToolCallArgsFinished, "lifecycle", None),
    "run.tool_call.finished": (ToolCallFinished, "lifecycle", None),
    "run.tool_call.error": (ToolCallError, "lifecycle", None),
    "run.state.snapshot": (StateSnapshot, "snapshot", None),
    "run.state.delta": (StateDelta, "state_delta", None),
    "run.messages.snapshot": (MessagesSnapshot, "other", None),
    "conversation.message.created": (ConversationMessageCreated, "lifecycle", "conversation"),
    "conversation.message.updated": (ConversationMessageUpdated, "other", "conversation"),
    "conversation.message.deleted": (ConversationMessageDeleted, "lifecycle", "conversation"),
    "conversation.participant.joined": (ParticipantJoined, "lifecycle", "conversation"),
    "conversation.participant.left": (ParticipantLeft, "lifecycle", "conversation"),
    "conversation.metadata.updated": (ConversationMetadataUpdated, "other", "conversation"),
    "process.started": (ProcessStarted, "lifecycle", "process"),
    "process.stage_changed": (ProcessStageChanged, "other", "process"),
    "process.progress": (ProcessProgress, "other", "process"),
    "process.input_required": (ProcessInputRequired, "lifecycle", "process"),
    "process.input_received": (ProcessInputReceived, "lifecycle", "process"),
    "process.completed": (ProcessCompleted, "lifecycle", "process"),
    "process.failed": (ProcessFailed, "lifecycle", "process"),
    "process.cancelled": (ProcessCancelled, "lifecycle", "process"),
}

EVENT_TYPES: Final[dict[str, type[BaseModel]]] = {t: spec[0] for t, spec in _CATALOGUE.items()}
# Hot-path form of the catalogue: the models' compiled validators (no model-class indirection) and
# the scope prefix a type is bound to.
_CONTRACTS: Final[dict[str, tuple[SchemaValidator | PluggableSchemaValidator, str | None]]] = {
    t: (model.__pydantic_validator__, None if kind is None else kind + ":")
    for t, (model, _, kind) in _CATALOGUE.items()
}
DELIVERY_CLASSES: Final[dict[str, DeliveryClass]] = {t: spec[1] for t, spec in _CATALOGUE.items()}
# Delta types and the data field naming the stream their chunks belong to.
_DELTA_KEY_FIELD: Final[dict[str, str]] = {
    "run.reasoning.delta": "message_id",
    "run.message.delta": "message_id",
    "run.tool_call.args.delta": "tool_call_id",
}
RUN_TYPE_PREFIX: Final = "run."


def delivery_class(event_type: str) -> DeliveryClass:
    """How the gateway may treat the event when a client falls behind; unknown types are ``other``."""
    return DELIVERY_CLASSES.get(event_type, "other")


def coalesce_key(env: Envelope) -> tuple[str, ...] | None:
    """``(type, message_id | tool_call_id)`` for delta events, whose consecutive chunks with the same
    key can be concatenated into one; ``None`` for everything else."""
    field = _DELTA_KEY_FIELD.get(env.type)
    if field is None:
        return None
    stream_id = env.data.get(field)
    return (env.type, stream_id) if isinstance(stream_id, str) else None


# --------------------------------------------------------------------------------------------------
# Subjects and scopes
# --------------------------------------------------------------------------------------------------


def parse_scope(scope: str) -> tuple[str, str]:
    """Split ``"conversation:c1"`` into ``("conversation", "c1")``; ``ValueError`` if malformed."""
    kind, sep, resource_id = scope.partition(":")
    if not sep or kind not in KINDS or not NAME_RE.match(resource_id):
        raise ValueError(f"scope must be <kind>:<id> with kind in {KINDS} and id matching {NAME_PATTERN}")
    return kind, resource_id


def check_prefix(prefix: str) -> str:
    """Validate a subject prefix (dot-separated tokens, no whitespace or wildcards) and return it."""
    if not _SUBJECT_PREFIX_RE.fullmatch(prefix):
        raise ValueError(f"bad subject prefix {prefix!r}: dot-separated tokens without spaces or wildcards")
    return prefix


def subject_for(prefix: str, tenant: str, scope: str) -> str:
    """The subject an event of ``tenant`` about ``scope`` is published on."""
    check_prefix(prefix)
    if not NAME_RE.match(tenant):
        raise ValueError(f"tenant must match {NAME_PATTERN}")
    kind, resource_id = parse_scope(scope)
    return f"{prefix}.{tenant}.{kind}.{resource_id}"


def tenant_subjects(prefix: str, tenant: str) -> str:
    """The subject filter matching every event of ``tenant``."""
    check_prefix(prefix)
    if not NAME_RE.match(tenant):
        raise ValueError(f"tenant must match {NAME_PATTERN}")
    return f"{prefix}.{tenant}.>"


@lru_cache(maxsize=32768)
def _split_subject(subject: str, prefix: str) -> tuple[str, str, str]:
    """``(tenant, kind, resource_id)`` of a subject under ``prefix``; raises ``InvalidEvent("subject")``.

    Cached: live resources publish many events on the same subject, and a cache hit is ten times
    cheaper than the split and two regex matches (failures are not cached, they are rare)."""
    head = prefix + "."
    if not subject.startswith(head):
        raise InvalidEvent("subject", f"subject {subject!r} is not under {head}")
    parts = subject[len(head) :].split(".")
    if len(parts) != 3 or parts[1] not in KINDS or not NAME_RE.match(parts[0]) or not NAME_RE.match(parts[2]):
        raise InvalidEvent("subject", f"subject {subject!r} is not {head}<tenant>.<kind>.<id>")
    return parts[0], parts[1], parts[2]


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _summarize(err: ValidationError, limit: int = 3) -> str:
    """A short, log-friendly account of a validation error (never the whole payload)."""
    parts = []
    for e in err.errors(include_url=False, include_input=False)[:limit]:
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        parts.append(f"{loc}: {e['msg']}")
    more = err.error_count() - limit
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


def check_type_contract(env: Envelope) -> None:
    """Rules that depend on the event type: run events need ``run_id``, typed ``data`` must fit its
    model and conversation/process events must be scoped to their kind. Raises ``InvalidEvent("data")``."""
    etype = env.type
    if env.run_id is None and etype.startswith(RUN_TYPE_PREFIX):
        raise InvalidEvent("data", f"{etype} requires the envelope's run_id")
    contract = _CONTRACTS.get(etype)
    if contract is None:
        return  # unknown type: forwarded untouched
    validator, scope_prefix = contract
    if scope_prefix is not None and not env.scope.startswith(scope_prefix):
        raise InvalidEvent("data", f"{etype} must be scoped to a {scope_prefix[:-1]}, not {env.scope}")
    try:
        validator.validate_python(env.data)
    except ValidationError as err:
        raise InvalidEvent("data", f"{etype} data: {_summarize(err)}") from None


def parse_event(raw: bytes | bytearray | str, subject: str, prefix: str = "events") -> Envelope:
    """Validate one event as received on ``subject`` and return its envelope.

    Checks, in order: the subject's shape (``subject``), the body is a JSON object (``json``), the
    envelope fields (``envelope``), the envelope's scope and tenant equal the subject's
    (``scope_mismatch``, ``tenant_mismatch``), and the type's contract (``data``). The first failure
    raises :class:`InvalidEvent` with that reason.
    """
    tenant, kind, resource_id = _split_subject(subject, prefix)
    try:
        env = Envelope.model_validate_json(raw)
    except ValidationError as err:
        first = err.errors(include_url=False, include_input=False)[0]
        if first["type"] == "json_invalid" or (first["type"] == "model_type" and not first["loc"]):
            raise InvalidEvent("json", "body is not a JSON object") from None
        raise InvalidEvent("envelope", _summarize(err)) from None
    if env.scope != f"{kind}:{resource_id}":
        raise InvalidEvent("scope_mismatch", f"scope {env.scope} does not match subject {subject}")
    if env.tenant != tenant:
        raise InvalidEvent("tenant_mismatch", f"tenant {env.tenant} does not match subject {subject}")
    check_type_contract(env)
    return env


__all__ = [
    "DELIVERY_CLASSES",
    "EVENT_TYPES",
    "KINDS",
    "NAME_BODY",
    "NAME_PATTERN",
    "NAME_RE",
    "SCOPE_BODY",
    "SCOPE_PATTERN",
    "SUBJECT_PREFIX_PATTERN",
    "ConversationMessageCreated",
    "ConversationMessageDeleted",
    "ConversationMessageUpdated",
    "ConversationMetadataUpdated",
    "Envelope",
    "EventData",
    "InvalidEvent",
    "MessageDelta",
    "MessageFinished",
    "MessageStarted",
    "MessagesSnapshot",
    "ParticipantJoined",
    "ParticipantLeft",
    "PatchAdd",
    "PatchCopy",
    "PatchMove",
    "PatchOp",
    "PatchRemove",
    "PatchReplace",
    "PatchTest",
    "ProcessCancelled",
    "ProcessCompleted",
    "ProcessFailed",
    "ProcessInputReceived",
    "ProcessInputRequired",
    "ProcessProgress",
    "ProcessStageChanged",
    "ProcessStarted",
    "ReasoningDelta",
    "ReasoningFinished",
    "ReasoningStarted",
    "RunFinished",
    "RunStarted",
    "RunStepFinished",
    "RunStepStarted",
    "StateDelta",
    "StateSnapshot",
    "TokenUsage",
    "ToolCallArgsDelta",
    "ToolCallArgsFinished",
    "ToolCallError",
    "ToolCallFinished",
    "ToolCallStarted",
    "check_prefix",
    "check_type_contract",
    "coalesce_key",
    "delivery_class",
    "parse_event",
    "parse_scope",
    "subject_for",
    "tenant_subjects",
]
