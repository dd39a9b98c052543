"""Log lines: one event per line, as JSON or for people, never with a PAN, PIN or key.

`configure_logging` installs one handler on stderr whose filter redacts every
record before it is formatted, and whose formatter redacts the finished line again
(exception text and extra fields included). What is redacted:
- digit runs of 12 digits or more (a PAN has 12 to 19; a longer run may hide one),
  with or without single spaces or dashes between digits: merchant ids of 15 digits
  are redacted too, the price of never missing a PAN;
- the value after a PIN-like name (`pin`, `user_pin`, `so-pin`, `KEYSVC_HSM_PIN`...)
  or `secret`, `password`, followed by `=` or `:`, and the word after a PIN-like
  name when it holds a digit (`PIN 1234`);
- hexadecimal runs of 32 or more digits (16 bytes or more: key material, MACs).
Events carry their fields as `extra`: request_id, rpc, duration_ms, status, peer.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
from datetime import datetime, timezone

LOG_FORMATS = ("human", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# Fields an event may carry (logging's `extra`), in the order they are shown.
EVENT_FIELDS = ("request_id", "identity", "rpc", "status", "duration_ms", "peer")

# Greedy from the leftmost digit, so a match is always a whole run: no lookarounds
# needed (they doubled the cost of every log line).
# The id of the call this thread is serving (set by the rpc layer's interceptor): every
# record made during the call carries it, whichever logger made it.
current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("keysvc_request_id", default=None)
# The caller's identity (set by the rpc layer's auth interceptor), for access events.
current_identity: contextvars.ContextVar[str] = contextvars.ContextVar("keysvc_identity", default="")
# The role the caller's call is made with (set by the auth interceptor), for metrics.
current_role: contextvars.ContextVar[str] = contextvars.ContextVar("keysvc_role", default="")

_PAN_LIKE = re.compile(r"[0-9](?:[ -]?[0-9]){11,}")
_SECRET_ASSIGNMENT = re.compile(
    r"(?i)(\b(?:[a-z0-9]+[_-])*(?:pin|secret|password|passwd)(?:[_-][a-z0-9]+)*\b[\"']?\s*[=:]\s*[\"']?)"
    r"(?!\[REDACTED)[^\s\"',;&|}\]]+"  # not "[REDACTED]" again: redacting twice changes nothing
)
# "PIN 1234", "pin 'x9y8'": a word after a PIN-like name, when it holds a digit.
_PIN_WORD = re.compile(r"(?i)(\b(?:[a-z0-9]+[_-])*pin\s+[\"']?)(?=[^\s\"']*[0-9])[^\s\"',;&|}\]]+")
_HEX_RUN = re.compile(r"[0-9a-fA-F]{32,}")
# The regular expressions for names are slow: run them only when a name may be there.
_SECRET_WORDS = ("pin", "secret", "passw")


def redact(text: str) -> str:
    """`text` with PAN-like digit runs, PIN and secret values, and long hex runs replaced."""
    lowered = text.lower()
    if any(word in lowered for word in _SECRET_WORDS):
        text = _SECRET_ASSIGNMENT.sub(r"\1[REDACTED]", text)
        if "pin" in lowered:
            text = _PIN_WORD.sub(r"\1[REDACTED]", text)
    text = _HEX_RUN.sub("[REDACTED-HEX]", text)
    return _PAN_LIKE.sub("[REDACTED-PAN]", text)


class RedactingFilter(logging.Filter):
    """Replaces a record's message (arguments merged) by its redacted text, so that no
    handler after it sees the original. (keysvc's formatters redact their whole line
    again, event fields and exception text included.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string must not leak its arguments
            message = f"unformattable log message from {record.name}"
        record.msg = redact(message)
        record.args = None
        if getattr(record, "request_id", None) is None:
            record.request_id = current_request_id.get()
        return True


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, pid, the event fields
    present, and the exception (type and stack) if any."""

    def format(self, record: logging.LogRecord) -> str:
        event = {
            "time": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for name in EVENT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                event[name] = value
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return redact(json.dumps(event, ensure_ascii=False, default=str))


class HumanFormatter(logging.Formatter):
    """`time LEVEL logger: message key=value...` for a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = [f"{name}={getattr(record, name)}" for name in EVENT_FIELDS if getattr(record, name, None) is not None]
        if fields:
            first, newline, rest = line.partition("\n")
            line = " ".join([first, *fields]) + newline + rest
        return redact(line)


def handler_for(log_format: str, stream=None) -> logging.Handler:
    """A stream handler (stderr by default) with the redacting filter and `log_format`."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else HumanFormatter())
    return handler


def configure_logging(log_format: str = "human", level: str = "INFO", stream=None) -> None:
    """Makes the root logger write to one redacting handler in `log_format`.

    The handler writes in the caller's thread. (A QueueListener thread was measured
    costing more CPU per call, not less: each record wakes it and the GIL changes
    hands twice.)
    """
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler_for(log_format, stream))
    root.setLevel(level)
