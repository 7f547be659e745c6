"""HTTP helpers shared by the tests of the dashboard server and the CLI."""

from urllib.error import HTTPError
from urllib.request import Request, urlopen


def get(url, headers=None, method="GET"):
    """(status, content type, body) of a request; HTTP errors are answers too."""
    try:
        with urlopen(Request(url, headers=headers or {}, method=method), timeout=10) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()
