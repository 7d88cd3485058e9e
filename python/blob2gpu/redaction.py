"""Secrets never leave blob2gpu: SAS signatures, account keys, bearer tokens and passwords in
URLs (a proxy's) are cut from any text (URLs, SDK messages) before it reaches an error, a log
record or a report."""

from __future__ import annotations

import re

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
    (
        re.compile(r"(?i)(Authorization:?\s*)(Bearer|SharedKey|Basic)\s+[^\s'\",]+"),
        r"\1\2 REDACTED",
    ),
    # user:password@ in a URL (a proxy's, from HTTPS_PROXY).
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@'\"]+@"), r"\1REDACTED@"),
    (re.compile(r"(?i)\bBearer\s+[A-Za-z0-9._~+/=-]{8,}"), "Bearer REDACTED"),
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
