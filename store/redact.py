"""Allowlist redaction of URLs and text, for everything that is written down.

Keeps scheme, host, port and path. Drops userinfo, the fragment, and the value of
every query parameter not on ``SAFE_QUERY_KEYS`` (names are kept so a reader can
tell a signed URL from a plain one). Anything that reaches the catalog, the metadata
card, a log line or an exception message goes through here first.

Free text (:func:`redact_text`) also loses its control characters other than tab and
newline, written as ``\\xNN``: a message may quote what a server sent (a registry's
error text, a hub listing's file name), and an escape sequence in it must not reach
the terminal that prints it.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

# Query parameters known to carry no secret.
SAFE_QUERY_KEYS = frozenset({"download", "revision", "ref", "format", "file", "filename"})
REDACTED = "REDACTED"

# Token shapes that must never be written even when they appear outside a URL.
_TOKEN_PATTERNS = [
    re.compile(r"hf_[A-Za-z0-9]{6,}"),
    re.compile(r"(?i)(authorization|x-amz-signature|x-amz-credential|x-amz-security-token|signature|token|sig)"
               r"(\s*[=:]\s*)([^\s&\"',;]+)"),
    re.compile(r"(?i)bearer\s+[A-Za-z0-9._~+/=-]+"),
]
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>]+")
# C0 controls but tab and newline, DEL, and the C1 controls (U+009B is a CSI on its own).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def redact_url(url: str) -> str:
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return REDACTED
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port else host
    query = ""
    if parts.query:
        pairs = []
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key.lower() in SAFE_QUERY_KEYS:
                pairs.append(f"{quote(key)}={quote(value)}")
            else:
                pairs.append(f"{quote(key)}={REDACTED}")
        query = "&".join(pairs)
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def drops_secrets(url: str) -> bool:
    """Whether :func:`redact_url` takes from ``url`` something a request may need: userinfo,
    or the value of a query parameter not on the allowlist (a signed URL's signature).
    What is stored of such a URL cannot fetch it again."""
    try:
        parts = urlsplit(url)
        if parts.username is not None or parts.password is not None:
            return True
    except ValueError:
        return True
    return any(key.lower() not in SAFE_QUERY_KEYS for key, _ in parse_qsl(parts.query, keep_blank_values=True))


def redact_text(text: str) -> str:
    """Redact every URL and token-looking thing in free text (log lines, error messages)."""
    text = _URL.sub(lambda m: redact_url(m.group(0)), text)
    text = _TOKEN_PATTERNS[0].sub("hf_" + REDACTED, text)
    text = _TOKEN_PATTERNS[1].sub(lambda m: m.group(1) + m.group(2) + REDACTED, text)
    text = _TOKEN_PATTERNS[2].sub("Bearer " + REDACTED, text)
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group(0)):02x}", text)
