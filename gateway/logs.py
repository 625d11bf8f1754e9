"""Logging set-up: one line per record (text or JSON), and the rule that a token never reaches a log line.

Why it is built this way:

* uvicorn's records are kept intact. Its access formatter (and ours) read the record's ``args``
  (``client_addr, method, path, http_version, status``), so redaction rewrites the secrets *inside*
  the arguments and leaves their number and types alone; a record without ``args`` would make every
  formatter that unpacks them fail ("--- Logging error ---" for every request).
* Redaction covers every way a token can be sent: a query parameter whose decoded name is
  ``access_token`` (``access_t%6Fken=`` is the same parameter to the server, so it is the same to the
  redaction), the ``bearer.<jwt>`` WebSocket subprotocol, an ``Authorization: Bearer`` value, and any
  compact JWT anywhere in a line. The formatters redact the finished line once more, tracebacks
  included.
* ``WSGATEWAY_LOG_FORMAT=json`` writes one JSON object per line for log pipelines; access lines carry
  ``method``, ``path`` (redacted), ``status`` and ``duration_ms``. uvicorn writes the access line when
  the response headers go out and knows no duration, so :class:`AccessTiming` (an ASGI wrapper
  around the app, HTTP only) measures the time from the request to its response headers and hands it
  to the line through a context variable.
"""

from __future__ import annotations

import contextvars
import datetime
import logging
import re
import sys
import time
from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote_plus, urlsplit, urlunsplit

import orjson

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from gateway.config import Settings

LogFormat = Literal["text", "json"]

#: Query parameters (compared after percent-decoding and lower-casing their names) that carry tokens.
TOKEN_PARAMETERS = frozenset({"access_token", "token", "id_token", "refresh_token"})
REDACTED = "REDACTED"

# `bearer.<jwt>` (the WebSocket subprotocol) and `Bearer <token>` (a header value; long words only, so
# that prose like "a bearer token" stays readable)
_BEARER_RE = re.compile(r"\b(bearer)(?:\.[A-Za-z0-9._~+/=%-]+|(\s+)[A-Za-z0-9._~+/=-]{16,})", re.IGNORECASE)
# name=value where the name starts a query string, a parameter or a word (so `/a/b?x=1` and `x=1 y=2`)
_PARAM_RE = re.compile(r"(?<![^?&;\s\"'(,])([A-Za-z0-9%._~+-]+)=([^&\s\"';,)]*)")
# A compact JWS (header.payload.signature): its header is base64url of '{"...', hence "eyJ".
_JWT_RE = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


def _param(match: re.Match[str]) -> str:
    name = match.group(1)
    if unquote_plus(name).lower() in TOKEN_PARAMETERS:
        return f"{name}={REDACTED}"
    return match.group(0)


def redact(text: str) -> str:
    """`text` without tokens: token query parameters, bearer values and JWTs become REDACTED."""
    if "=" not in text and "eyJ" not in text and "earer" not in text.lower():
        return text  # the common case: nothing that could be a token
    text = _BEARER_RE.sub(lambda m: f"{m.group(1)}{' ' if m.group(2) else '.'}{REDACTED}", text)
    text = _PARAM_RE.sub(_param, text)
    return _JWT_RE.sub(REDACTED, text)


def _redact_arg(value: object) -> object:
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, int | float):
        return value  # keeps %d / %.1f working
    text = str(value)
    cleaned = redact(text)
    return value if cleaned == text else cleaned


class RedactTokens(logging.Filter):
    """Redacts tokens in a record's message and inside its arguments; the record stays formattable."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        args = record.args
        if isinstance(args, tuple):
            record.args = tuple(_redact_arg(a) for a in args)
        elif isinstance(args, Mapping):
            record.args = {k: _redact_arg(v) for k, v in args.items()}
        return True


# --- access-line duration ----------------------------------------------------------------------

_response_started_ms: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "wsgateway_response_started_ms", default=None
)


class AccessTiming:
    """ASGI wrapper: the time from an HTTP request to its response headers, for the access line.

    uvicorn logs the access line inside the `send` of `http.response.start`, in the same context as
    the caller, so a context variable set just before that call is what the line's record sees.
    WebSocket and lifespan scopes pass straight through.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # not a coroutine itself: a WebSocket gets the app's own coroutine, so an idle connection does not
        # keep one more frame alive for its whole life
        if scope["type"] != "http":
            return self.app(scope, receive, send)
        return self._timed(scope, receive, send)

    async def _timed(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                _response_started_ms.set((time.perf_counter() - start) * 1000)
            await send(message)

        await self.app(scope, receive, timed_send)


class AccessDuration(logging.Filter):
    """Puts `duration_ms` on uvicorn's access records (None when not measured)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "uvicorn.access":
            setattr(record, "duration_ms", _response_started_ms.get())  # noqa: B010
        return True


# --- formatters --------------------------------------------------------------------------------


def _access_fields(record: logging.LogRecord) -> dict[str, Any] | None:
    """method, path, status, ... of a uvicorn access record (args: client, method, path, http version, status)."""
    args = record.args
    if record.name != "uvicorn.access" or not isinstance(args, tuple) or len(args) != 5:
        return None
    client, method, path, http_version, status = args
    fields: dict[str, Any] = {
        "client": client, "method": method, "path": redact(str(path)), "http_version": http_version,
        "status": status,
    }
    duration = getattr(record, "duration_ms", None)
    if isinstance(duration, float):
        fields["duration_ms"] = round(duration, 3)
    return fields


_WS_LINE = re.compile(r'^(?P<client>\S*) - "WebSocket (?P<path>\S+)" (?P<outcome>\S+)$')


def _websocket_fields(record: logging.LogRecord, message: str) -> dict[str, Any] | None:
    """path and status of uvicorn's WebSocket handshake lines (`... "WebSocket /v1/ws?..." [accepted]`)."""
    if not record.name.startswith("uvicorn") or "WebSocket" not in message:
        return None
    m = _WS_LINE.match(message)
    if m is None:
        return None
    outcome = m.group("outcome")
    status: int | str = 101 if outcome == "[accepted]" else int(outcome) if outcome.isdigit() else outcome
    return {"client": m.group("client"), "method": "WEBSOCKET", "path": m.group("path"), "status": status}


def _iso_time(created: float) -> str:
    t = datetime.datetime.fromtimestamp(created, tz=datetime.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


class TextFormatter(logging.Formatter):
    """`2025-05-20T10:00:00.123Z INFO uvicorn.access: 127.0.0.1:5000 - "GET /readyz HTTP/1.1" 200 0.8ms`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _iso_time(record.created)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        duration = getattr(record, "duration_ms", None)
        if record.name == "uvicorn.access" and isinstance(duration, float):
            head, sep, tail = line.partition("\n")  # after the request line, before any traceback
            line = f"{head} {duration:.1f}ms{sep}{tail}"
        return redact(line)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (+ access fields, exception)."""

    def format(self, record: logging.LogRecord) -> str:
        message = redact(record.getMessage())
        out: dict[str, Any] = {
            "time": _iso_time(record.created), "level": record.levelname.lower(), "logger": record.name,
            "message": message,
        }
        extra = _access_fields(record) or _websocket_fields(record, message)
        if extra:
            out.update(extra)
        if record.exc_info:
            out["exception"] = redact(self.formatException(record.exc_info))
        if record.stack_info:
            out["stack"] = redact(self.formatStack(record.stack_info))
        return orjson.dumps(out, default=str).decode()


_FILTER = RedactTokens()
_DURATION = AccessDuration()
_HANDLER_MARK = "_wsgateway_handler"


def _level(level: str) -> int:
    numeric = logging.getLevelName(level.upper())
    return numeric if isinstance(numeric, int) else logging.INFO


def configure_logging(level: str, fmt: str = "text") -> None:
    """`wsgateway serve`: every record (the gateway's, uvicorn's server, handshake and access lines,
    libraries' warnings) goes to stderr as one line of `fmt` ("text" or "json"), tokens redacted.

    `gateway.*` and uvicorn's loggers log at `level`, other libraries at warning. Idempotent: the
    gateway's handler is replaced, so the CLI and each worker process may call it.
    """
    numeric = _level(level)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    setattr(handler, _HANDLER_MARK, True)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_FILTER)  # handler filters see records of every logger, children included
    handler.addFilter(_DURATION)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    for name in ("gateway", "wsgateway_operator", "uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.setLevel(numeric)
        if name.startswith("uvicorn"):  # drop uvicorn's own handlers (its dictConfig), keep one line each
            for h in list(logger.handlers):
                logger.removeHandler(h)
            logger.propagate = True
    install_redaction()


def install_redaction() -> None:
    """Attach the filter to the loggers that print request paths (idempotent).

    Logger filters also cover handlers the gateway did not install (uvicorn's own in `wsgateway dev`,
    pytest's log capture).
    """
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "gateway"):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


# --- the start-up line -------------------------------------------------------------------------


def _without_credentials(url: str) -> str:
    """A URL without user, password and query (where tokens and passwords travel)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if not parts.scheme or not parts.netloc:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def safe_urls(value: str) -> str:
    """Comma-separated URLs (WSGATEWAY_NATS_URL) without credentials."""
    return ",".join(_without_credentials(u.strip()) for u in value.split(",") if u.strip())


def config_summary(settings: Settings) -> str:
    """Every setting as `name=value`, URLs without credentials (no setting holds a secret itself: the
    NATS credentials are a file, named by its path)."""
    parts = []
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is None:
            shown = "unset"
        elif isinstance(value, bool):
            shown = "true" if value else "false"
        elif isinstance(value, str) and "://" in value:
            shown = safe_urls(value)
        else:
            shown = str(value)
        if " " in shown or not shown:
            shown = repr(shown)
        parts.append(f"{name}={shown}")
    return " ".join(parts)


# --- repeated failures -------------------------------------------------------------------------


class BackoffLog:
    """Reports a failure that repeats (a NATS server that cannot be reached) without flooding the log:
    the first failure at once, then at most one line per interval, the interval doubling from
    `first_interval_s` up to `max_interval_s`, each line with the number of failures since the last one.
    `reset()` (on success) starts over and returns how many failures there were.
    """

    def __init__(self, first_interval_s: float = 2.0, max_interval_s: float = 60.0) -> None:
        self.first_interval_s = first_interval_s
        self.max_interval_s = max_interval_s
        self.failures = 0  # since the last reset
        self._unreported = 0
        self._next_report = 0.0
        self._interval = first_interval_s

    def failed(self, now: float | None = None) -> tuple[int, float] | None:
        """Count one failure; returns (failures since the last report, seconds to the next report) when
        this one is to be reported, else None."""
        now = time.monotonic() if now is None else now
        self.failures += 1
        self._unreported += 1
        if self.failures > 1 and now < self._next_report:
            return None
        count, self._unreported = self._unreported, 0
        interval = self._interval
        self._next_report = now + interval
        self._interval = min(self._interval * 2, self.max_interval_s)
        return count, interval

    def reset(self) -> int:
        failures, self.failures, self._unreported = self.failures, 0, 0
        self._interval = self.first_interval_s
        self._next_report = 0.0
        return failures
