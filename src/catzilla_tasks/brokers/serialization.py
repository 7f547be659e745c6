"""How tasks and results travel through a broker: msgpack (default), JSON, or pickle (opt-in).

Every payload starts with one byte naming its format (``m`` msgpack, ``j`` JSON, ``p`` pickle),
so a worker reads what any producer sent and refuses what it was not allowed to accept.

A task message is ``[task_id, name, args, kwargs]`` with two optional trailing items,
``attempt`` (0 for the first run) and ``opts`` (per-call overrides and the idempotency key).
Tuples arrive as lists with msgpack and JSON; JSON also turns dict keys into strings.

Pickle runs code chosen by whoever can write to the broker: a shared Redis would become a
code-execution channel. It is refused unless both the producer and the worker were created with
``allow_pickle=True``.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import DecodeError

__all__ = ["Serializer", "DecodeError", "SERIALIZERS"]

SERIALIZERS = ("msgpack", "json", "pickle")


def msgpack_module() -> Any:
    """The msgpack package (imported on first use), or ImportError saying how to get it."""
    try:
        import msgpack
    except ImportError:  # pragma: no cover - the [redis] extra installs it
        raise ImportError(
            "the msgpack serializer needs the msgpack package: pip install 'catzilla-tasks[redis]' "
            "(or choose serializer='json')"
        ) from None
    return msgpack


class Serializer:
    """Encodes with one format; decodes every allowed format (by the payload's first byte)."""

    __slots__ = ("name", "allow_pickle", "_dumps", "_prefix", "_mp_unpackb")

    def __init__(self, name: str = "msgpack", *, allow_pickle: bool = False) -> None:
        if name not in SERIALIZERS:
            raise ValueError(f"serializer: must be one of {', '.join(map(repr, SERIALIZERS))}, got {name!r}")
        if name == "pickle" and not allow_pickle:
            raise ValueError(
                "serializer='pickle' runs code chosen by anyone who can write to the broker; "
                "pass allow_pickle=True (on the producer and on the worker) to accept that risk"
            )
        self.name = name
        self.allow_pickle = bool(allow_pickle)
        self._mp_unpackb: Any = None
        try:
            mp = msgpack_module()
            packer = mp.Packer(use_bin_type=True, autoreset=True)
            self._mp_unpackb = mp.unpackb
        except ImportError:
            if name == "msgpack":
                raise
            packer = None
        if name == "msgpack":
            self._prefix = b"m"
            self._dumps = packer.pack
        elif name == "json":
            self._prefix = b"j"
            self._dumps = lambda obj: json.dumps(obj, separators=(",", ":")).encode()
        else:
            import pickle  # only when chosen: a worker without pickle never loads it

            self._prefix = b"p"
            self._dumps = lambda obj: pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)

    def dumps(self, obj: Any) -> bytes:
        """Encode (TypeError naming the format when a value cannot travel in it)."""
        try:
            return self._prefix + self._dumps(obj)
        except (TypeError, ValueError, OverflowError) as exc:
            raise TypeError(
                f"cannot encode with {self.name}: {exc}; tasks travel with plain values (numbers, "
                "strings, bytes, lists, dicts), pass ids instead of objects, or use serializer='pickle'"
            ) from None

    def loads(self, data: bytes) -> Any:
        """Decode a payload of any format this side accepts; DecodeError otherwise."""
        if not isinstance(data, (bytes, bytearray)) or not data:
            raise DecodeError(f"empty or non-bytes payload: {data!r:.60}")
        kind = data[:1]
        body = data[1:]
        try:
            if kind == b"m":
                if self._mp_unpackb is None:
                    raise DecodeError("a msgpack payload, and msgpack is not installed here")
                return self._mp_unpackb(body, raw=False, strict_map_key=False)
            if kind == b"j":
                return json.loads(body)
            if kind == b"p":
                if not self.allow_pickle:
                    raise DecodeError("a pickle payload, and this side was not created with allow_pickle=True")
                import pickle

                return pickle.loads(body)  # noqa: S301 - only with allow_pickle=True on this side (opt-in, SECURITY.md)
        except DecodeError:
            raise
        except Exception as exc:
            raise DecodeError(
                f"undecodable {kind.decode(errors='replace')!r} payload: {type(exc).__name__}: {exc}"
            ) from None
        raise DecodeError(f"unknown payload format {bytes(data[:12])!r}")

    def same_format(self, data: bytes) -> Serializer:
        """A serializer writing in the format of ``data`` (results go back as the task came)."""
        kind = data[:1]
        want = {b"m": "msgpack", b"j": "json", b"p": "pickle"}.get(kind, self.name)
        if want == self.name:
            return self
        return _cached(want, self.allow_pickle)


_CACHE: dict[tuple[str, bool], Serializer] = {}


def _cached(name: str, allow_pickle: bool) -> Serializer:
    key = (name, allow_pickle)
    s = _CACHE.get(key)
    if s is None:
        s = _CACHE[key] = Serializer(name, allow_pickle=allow_pickle)
    return s
