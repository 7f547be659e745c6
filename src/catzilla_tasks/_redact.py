"""Secrets out of URLs and messages: what reprs, log lines, errors and served stats show.

``redact_url(url)`` replaces the userinfo's password (``user:***@``; a user name alone, which
some services take as a token, becomes ``***@``) and the value of every query or fragment
parameter whose name says it is a secret (``password``, ``token``, ``secret``, ``api_key``,
``auth``...) with ``***``. It parses the URL with the RFC 3986 pattern (no port or host
validation), so it never raises and keeps everything else as written: IPv6 brackets, the
``unix:///path`` form, the order and spelling of the other parameters.

``redact_text(text)`` does the same to every URL in a free text (an exception message, a
connection error) and to ``password=...``-style pairs outside URLs (libpq-style DSNs).
"""

from __future__ import annotations

import re

__all__ = ["redact_url", "redact_text"]

MASK = "***"

# RFC 3986, appendix B: scheme, authority, path, query, fragment (always matches)
_URI = re.compile(r"^(?P<scheme>[^:/?#]+:)?(?://(?P<authority>[^/?#]*))?(?P<path>[^?#]*)"
                  r"(?:\?(?P<query>[^#]*))?(?:#(?P<fragment>.*))?$", re.S)
# parameter names that carry secrets (matched against the lower-cased, unquoted name)
_SECRET_NAME = re.compile(r"pass|pwd|token|secret|api[-_]?key|auth|credential|signature|session|private"
                          r"|^key$|^sig$|^code$", re.I)
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")
_PAIR_IN_TEXT = re.compile(r"(?P<name>\b[\w.-]*(?:pass|pwd|token|secret|api[-_]?key|credential)[\w.-]*)"
                           r"(?P<sep>\s*=\s*)(?P<value>'[^']*'|\"[^\"]*\"|[^\s&,;'\"]+)", re.I)


def _secret_name(name: str) -> bool:
    from urllib.parse import unquote_plus

    return bool(_SECRET_NAME.search(unquote_plus(name)))


def _params(text: str) -> str:
    """``a=1&token=x`` -> ``a=1&token=***`` (``&`` and ``;`` separators kept)."""
    parts = re.split(r"([&;])", text)
    for i in range(0, len(parts), 2):
        name, eq, value = parts[i].partition("=")
        if eq and value and _secret_name(name):
            parts[i] = f"{name}={MASK}"
    return "".join(parts)


def redact_url(url: str) -> str:
    """``url`` with its password, secret-looking user name and secret query parameters masked."""
    if not isinstance(url, str):
        url = str(url)
    m = _URI.match(url)
    if m is None:  # cannot happen (every group is optional); never show what was not understood
        return MASK
    scheme, authority, path, query, fragment = m.group("scheme", "authority", "path", "query", "fragment")
    out = [scheme or ""]
    if authority is not None:
        userinfo, at, hostport = authority.rpartition("@")  # a raw '@' in a password: the last one ends it
        if at:
            user, colon, _ = userinfo.partition(":")
            userinfo = f"{user}:{MASK}" if colon else MASK
            authority = f"{userinfo}@{hostport}"
        out.append("//" + authority)
    out.append(path)
    if query is not None:
        out.append("?" + _params(query))
    if fragment is not None:
        out.append("#" + (_params(fragment) if "=" in fragment else fragment))
    return "".join(out)


def redact_text(text: str) -> str:
    """``text`` with every URL in it redacted, and ``password=...``-style pairs masked."""
    if not isinstance(text, str):
        text = str(text)
    if "://" in text:
        text = _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)
    if "=" not in text:  # the common case, at the cost of one scan
        return text
    return _PAIR_IN_TEXT.sub(lambda m: f"{m.group('name')}{m.group('sep')}{MASK}"
                             if m.group("value") != MASK else m.group(0), text)
