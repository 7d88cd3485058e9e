"""Secrets never leave blob2gpu: SAS signatures, account keys, bearer tokens and passwords in
URLs (a proxy's) are cut from any text (URLs, SDK messages) before it reaches an error, a log
record or a report.

Three ways out are closed here:
- text: redact() on whatever blob2gpu puts in a message, a report or a log line;
- logs of the HTTP stack blob2gpu drives: install_log_redaction() redacts every record of the
  loggers under LOGGERS (urllib3's request lines carry each request's URL, SAS and all, at
  DEBUG; azure-core's and azure-identity's carry headers and token requests), at any level,
  their exception text included, before any handler sees it;
- chained exceptions: an SDK's exception holds the request and its URL, so a typed error raised
  while handling one must not keep it as its __context__ (raising ``from None`` only hides it
  from tracebacks); detached() cuts the chain, and the error is raised outside the except block.
"""

from __future__ import annotations

import logging
import re
import threading
import traceback
from typing import Any, TypeVar

_E = TypeVar("_E", bound=BaseException)

_PATTERNS = (
    # SAS query parameters whose value is or guards a secret.
    (
        re.compile(
            r"(?i)\b(sig|signature|se|st|sp|sv|ss|srt|sr|skoid|sktid|skt|ske|sks|skv|spr|sip)"
            r"=[^&\s'\"]*"
        ),
        r"\1=REDACTED",
    ),
    (re.compile(r"(?i)(AccountKey|SharedAccessSignature)=[^;\s'\"]*"), r"\1=REDACTED"),
    # An Authorization header as text ("Authorization: Bearer x") or as a logged mapping
    # ("'Authorization': 'SharedKey account:signature'").
    (
        re.compile(
            r"(?i)((?:Proxy-)?Authorization['\"]?:?\s*['\"]?)(Bearer|SharedKey|Basic)\s+[^\s'\",]+"
        ),
        r"\1\2 REDACTED",
    ),
    # Azure's AuthenticationFailed detail quotes the request's Shared Key signature: "The MAC
    # signature found in the HTTP request '<signature>' is not the same as any computed ...".
    (re.compile(r"(?i)(signature found in the HTTP request\s*['\"])[^'\"\s]*"), r"\1REDACTED"),
    # user:password@ in a URL (a proxy's, from HTTPS_PROXY).
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@'\"]+@"), r"\1REDACTED@"),
    (re.compile(r"(?i)\bBearer\s+[A-Za-z0-9._~+/=-]{8,}"), "Bearer REDACTED"),
    # OAuth token requests and answers (azure-identity at DEBUG): form fields and JSON members.
    (
        re.compile(
            r"(?i)\b(client_secret|client_assertion|refresh_token|access_token|assertion)"
            r"(=|['\"]\s*:\s*['\"])[^&\s'\",]+"
        ),
        r"\1\2REDACTED",
    ),
)


def redact(text: object) -> str:
    """`text` as a string with every secret replaced by REDACTED."""
    out = str(text)
    for pattern, replacement in _PATTERNS:
        out = pattern.sub(replacement, out)
    return out


def strip_query(url: str) -> str:
    """A URL without its query string (where a SAS token lives)."""
    return url.split("?", 1)[0]


def detached(error: _E) -> _E:
    """`error` without the exceptions chained to it (__cause__, __context__), which may be an
    SDK's holding a request URL and its SAS. Raise it outside any except block: a raise inside
    one chains the exception being handled again."""
    error.__cause__ = None
    error.__context__ = None
    error.__suppress_context__ = True
    return error


# The loggers of the HTTP stack blob2gpu drives, and its own; a record of any logger below them
# ("urllib3.connectionpool", "azure.core.pipeline.policies.http_logging_policy") is redacted.
LOGGERS = ("urllib3", "azure", "msal", "requests", "blob2gpu")


class RedactingFilter(logging.Filter):
    """A logging filter that redacts a record in place (its message with its arguments merged,
    its exception and stack text) and lets it through."""

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True


def redact_record(record: logging.LogRecord) -> None:
    """Redact `record` in place: its message (arguments merged in) and any exception or stack
    text, which is formatted here (exc_info is then dropped: a handler would format it again
    from the exception)."""
    if getattr(record, "_blob2gpu_redacted", False):
        return
    try:
        message = record.getMessage()
    except Exception:  # a record whose arguments do not fit its format: keep its parts apart
        message = f"{record.msg} {record.args}"
    record.msg, record.args = redact(message), None
    if record.exc_info:
        record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        record.exc_info = None
    if record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    record.__dict__["_blob2gpu_redacted"] = True


_install_lock = threading.Lock()


def install_log_redaction() -> None:
    """Redact every record of the loggers under LOGGERS, whatever their level and handlers: the
    process's log record factory is wrapped (once) so that a record of theirs is redacted as it
    is made, whichever logger below them makes it, and a RedactingFilter sits on each of those
    loggers that exists already (a logger's filters see only its own records, not its
    children's: hence the factory; the filters keep them redacted should a logging setup later
    replace the factory without calling the one it found). Idempotent; blob2gpu calls it before
    it sends its first request to storage."""
    with _install_lock:
        factory = logging.getLogRecordFactory()
        if not getattr(factory, "_blob2gpu_redacts", False):
            logging.setLogRecordFactory(_redacting_factory(factory))
        prefixes = tuple(f"{name}." for name in LOGGERS)
        names = [*LOGGERS, *logging.Logger.manager.loggerDict]
        for name in names:
            if name in LOGGERS or name.startswith(prefixes):
                logger = logging.getLogger(name)
                if not any(isinstance(f, RedactingFilter) for f in logger.filters):
                    logger.addFilter(RedactingFilter())


def _redacting_factory(inner: Any) -> Any:
    prefixes = tuple(f"{name}." for name in LOGGERS)

    def make(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record: logging.LogRecord = inner(*args, **kwargs)
        if record.name in LOGGERS or record.name.startswith(prefixes):
            redact_record(record)
        return record

    make._blob2gpu_redacts = True  # type: ignore[attr-defined]
    return make
