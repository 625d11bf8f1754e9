"""Logging set-up, including the rule that a token never reaches a log line."""

from __future__ import annotations

import logging
import re

_TOKEN_RE = re.compile(r"((?:access_token|token)=)[^&\s\"']+|(bearer\.)[A-Za-z0-9._~+/=-]+", re.IGNORECASE)


def redact(text: str) -> str:
    return _TOKEN_RE.sub(lambda m: (m.group(1) or m.group(2)) + "REDACTED", text)


class RedactTokens(logging.Filter):
    """Rewrites records so query-string tokens (uvicorn logs request paths) never get out."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            record.msg = redact(record.getMessage())
            record.args = None
        elif isinstance(record.msg, str):
            record.msg = redact(record.msg)
        return True


_FILTER = RedactTokens()


def configure_logging(level: str) -> None:
    """`wsgateway serve` workers: gateway.* loggers at `level`, one line per record, tokens redacted."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("gateway").setLevel(numeric)
    for handler in root.handlers:  # handler filters see records of every logger, children included
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)
    install_redaction()


def install_redaction() -> None:
    """Attach the filter to the loggers that print request paths (idempotent)."""
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "gateway"):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
