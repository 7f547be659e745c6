"""Secrets out of URLs and messages: what reprs, log lines, errors and served stats show.

``redact_url(url)`` replaces the userinfo's password (``user:***@``; a user name alone, which
some services take as a token, becomes ``***@``) and the value of every query or fragment
parameter whose name says it is a secret (``password``, ``token``, ``secret``, ``api_key``,
``auth``...) with ``***``. It parses the URL with the RFC 3986 pattern (no port or host
validation), so it never raises and keeps everything else as written: IPv6 brackets, the
``unix:///path`` form, the order and spelling of the other parameters.

A password written without percent-encoding a ``/``, ``?`` or ``#`` (``redis://:ab/cd@host``)
ends the RFC 3986 authority early, where no ``@`` is left: an authority that is then no
``host[:port]`` list is taken as cut short, and the userinfo runs to the URL's last ``@``
(with no ``@`` at all, what follows the first ``:`` is masked: it is no port).

``redact_text(text)`` does the same to every URL in a free text (an exception message, a
connection error), to secret-named parameters of a query written without scheme and host
(``/v1/x?auth=...``, as HTTP clients quote the request), to ``password=...``-style pairs
(libpq-style DSNs) and to the same names as quoted keys of a dict or JSON text
(``{'password': '...'}``).
"""

from __future__ import annotations

import re

__all__ = ["redact_url", "redact_text"]

MASK = "***"

# RFC 3986, appendix B: scheme, authority, path, query, fragment (always matches)
_URI = re.compile(
    r"^(?P<scheme>[^:/?#]+:)?(?://(?P<authority>[^/?#]*))?(?P<path>[^?#]*)"
    r"(?:\?(?P<query>[^#]*))?(?:#(?P<fragment>.*))?$",
    re.S,
)
# parameter names that carry secrets (matched against the lower-cased, unquoted name)
_SECRET_NAME = re.compile(
    r"pass|pwd|token|secret|api[-_]?key|auth|credential|signature|session|private"
    r"|^key$|^sig$|^code$",
    re.I,
)
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")
# name=value, or 'name': value / "name": value (a dict's or JSON's quoted key); the name is
# tested by _PAIR_NAME afterwards (one regex with the words inside would backtrack on every word)
_PAIR_IN_TEXT = re.compile(
    r"(?P<name>(?P<q>['\"]?)\b[\w.-]+(?P=q))(?P<sep>\s*=\s*|(?<=['\"])\s*:\s*)"
    r"(?P<value>b?'[^']*'|b?\"[^\"]*\"|[^\s&,;'\"}]+)"
)
_PAIR_NAME = re.compile(r"pass|pwd|token|secret|api[-_]?key|credential", re.I)
_PAIR_WORDS = ("pass", "pwd", "token", "secret", "key", "credential")  # words of _PAIR_IN_TEXT's names
# a query's parameter where no URL was seen: after '?', '&' or ';' (a path-only request line)
_QUERY_PAIR_IN_TEXT = re.compile(r"(?<=[?&;])(?P<name>[^=&;#?\s'\"<>]+)=(?P<value>[^&;#\s'\"<>]+)")
# what an authority without userinfo looks like: host[:port], comma-separated for redis+sentinel://
_HOSTPORT = re.compile(r"(?:\[[^\]]*\]|[^:@\[\]]*)(?::\d*)?")


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
            authority = f"{_mask_userinfo(userinfo)}@{hostport}"
        elif not all(_HOSTPORT.fullmatch(a) for a in authority.split(",")):
            # no host[:port]: a raw '/', '?' or '#' in a password ended the authority early
            userinfo, at, rest = url[m.start("authority") :].rpartition("@")
            if at:
                return f"{scheme or ''}//{_mask_userinfo(userinfo)}@" + redact_url("//" + rest)[2:]
            authority = authority.partition(":")[0] + ":" + MASK  # no '@' at all: no port, maybe a password
        out.append("//" + authority)
    out.append(path)
    if query is not None:
        out.append("?" + _params(query))
    if fragment is not None:
        out.append("#" + (_params(fragment) if "=" in fragment else fragment))
    return "".join(out)


def _mask_userinfo(userinfo: str) -> str:
    user, colon, _ = userinfo.partition(":")
    return f"{user}:{MASK}" if colon else MASK


def _mask_query_pair(m: re.Match[str]) -> str:
    if m.group("value") == MASK or not _secret_name(m.group("name")):
        return m.group(0)
    return f"{m.group('name')}={MASK}"


def _mask_pair(m: re.Match[str]) -> str:
    if m.group("value") == MASK or not _PAIR_NAME.search(m.group("name")):
        return m.group(0)
    return f"{m.group('name')}{m.group('sep')}{MASK}"


def redact_text(text: str) -> str:
    """``text`` with every URL in it redacted, secret query parameters without a URL around
    them, ``password=...``-style pairs and ``'password': ...`` dict/JSON items masked."""
    if not isinstance(text, str):
        text = str(text)
    if "://" in text:
        text = _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)
    if "=" in text and ("?" in text or "&" in text or ";" in text):
        text = _QUERY_PAIR_IN_TEXT.sub(_mask_query_pair, text)
    # the common case (no separator of a pair, or none of its words) at the cost of a few substring scans
    if "=" not in text and "':" not in text and '":' not in text:
        return text
    lower = text.lower()
    if not any(w in lower for w in _PAIR_WORDS):
        return text
    return _PAIR_IN_TEXT.sub(_mask_pair, text)
