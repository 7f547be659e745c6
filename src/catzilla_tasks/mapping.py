"""``tasks.map``: a batch of calls of one function, as native chunks or windowed Python tasks.

``MapInput`` reads the arguments (lists, tuples, buffers, one column per parameter),
``map_native`` runs a compiled task over them in chunks on the native workers (through the
engine's ``_map_native``/``_map_native_buffers``), ``map_python`` queues Python tasks a window at
a time, ``check_out``/``python_out`` handle ``out=``, and ``refuse_batch`` says why a task with
``compile_to_c="require"`` could not run natively. The compiler (``compiler/``) only
compiles: this module is given its ``NativeTask`` and asks it for signatures (``spec_for``).
"""

from __future__ import annotations

import logging
import reprlib
import sys
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .errors import CompileError

if TYPE_CHECKING:
    from .compiler import NativeTask, _Spec

__all__ = ["MapInput", "check_out", "map_native", "map_python", "python_out", "refuse_batch"]

log = logging.getLogger("catzilla_tasks.mapping")

# the names of the compiled type codes (as the compiler and _engine/py_native.c spell them)
_TYPE_NAMES = {"i": "int", "f": "float", "b": "bool"}


def _names(codes: str) -> str:
    return ", ".join(_TYPE_NAMES[c] for c in codes)


def _auto_chunk(n: int, workers: int) -> int:
    # at least 8 nodes per worker (balance), at most 4096 items per node
    return max(1, min(4096, -(-n // (8 * max(1, workers)))))


# Buffer inputs and outputs: the item formats a compiled task reads from a buffer (native byte
# order; numpy's int64 is "l"), and the array.array type codes of its results.
_BUFFER_CODES = {"q": "i", "l": "i", "n": "i", "d": "f", "?": "b"}
_FORMAT_NAMES = {
    "b": "int8",
    "B": "uint8",
    "h": "int16",
    "H": "uint16",
    "i": "int32",
    "I": "uint32",
    "l": "long",
    "L": "unsigned long",
    "q": "int64",
    "Q": "uint64",
    "n": "ssize_t",
    "N": "size_t",
    "e": "float16",
    "f": "float32",
    "d": "float64",
    "?": "bool",
}
_CODE_FORMATS = {"i": "int64 (format 'q')", "f": "float64 (format 'd')", "b": "bool (format '?')"}
_ARRAY_TYPECODES = {"i": "q", "f": "d", "b": "B"}
_ITEMSIZES = {"i": 8, "f": 8, "b": 1}


def _buffer_code(mv: memoryview, for_out: bool = False) -> str | None:
    """The type code ("i", "f", "b") of a buffer's items, or None (see buffer_code in _engine/py_native.c)."""
    fmt = mv.format
    if fmt[:1] in ("@", "=") or (fmt[:1] == "<" and sys.byteorder == "little"):
        fmt = fmt[1:]
    code = _BUFFER_CODES.get(fmt) or ("b" if for_out and fmt == "B" else None)
    return code if code is not None and mv.itemsize == _ITEMSIZES[code] else None


def _format_name(mv: memoryview) -> str:
    f = mv.format
    name = _FORMAT_NAMES.get(f.lstrip("@=<>!"))
    return f"'{f}' ({name}, {mv.itemsize} bytes)" if name else f"'{f}' ({mv.itemsize} bytes)"


class MapInput:
    """The arguments of one ``tasks.map`` call, with the memoryviews it holds until ``close()``.

    ``tasks.map(f, items)``: a list or tuple (any iterable) of items, each a tuple of positional
    arguments or one value; or an object with the buffer protocol: 1-D, one value per item, or
    2-D of shape (n, k), one row of k arguments per item. ``tasks.map(f, col0, col1, ...)``: one
    iterable per parameter, like the built-in ``map`` (equal lengths); when every one is a 1-D
    buffer the native workers read them in place.
    """

    def __init__(self, first: Any, more: tuple = ()) -> None:
        self.items: Sequence[Any] | None = None
        self.columns: list[tuple[Any, int, memoryview]] | None = None  # (obj, j, view) per argument
        self._views: list[memoryview] = []
        try:
            self._init(first, more)
        except BaseException:
            self.close()
            raise

    def _view(self, obj: Any) -> memoryview | None:
        if isinstance(obj, (list, tuple, str)):
            return None
        try:
            mv = memoryview(obj)
        except TypeError:
            return None
        self._views.append(mv)
        return mv

    def _init(self, first: Any, more: tuple) -> None:
        if not more:
            mv = self._view(first)
            if mv is None:
                self.items = first if isinstance(first, (list, tuple)) else list(first)
            elif mv.ndim == 1:
                self.columns = [(first, -1, mv)]
            elif mv.ndim == 2 and mv.shape[1]:  # type: ignore[index]
                self.columns = [(first, j, mv) for j in range(mv.shape[1])]  # type: ignore[index]
            else:
                raise TypeError(
                    f"tasks.map(): a buffer of arguments must be 1-D (one value per item) or 2-D "
                    f"(one row of arguments per item), got {mv.ndim} dimensions, shape {mv.shape}"
                )
            return
        cols = (first, *more)
        views = [self._view(c) for c in cols]
        for k, mv in enumerate(views):
            if mv is not None and mv.ndim != 1:
                raise TypeError(
                    f"tasks.map(): with one iterable per argument each is one argument's column; "
                    f"argument {k} is a buffer of {mv.ndim} dimensions"
                )
        present = [mv for mv in views if mv is not None]
        if len(present) == len(views):
            if len({len(mv) for mv in present}) > 1:
                raise ValueError(
                    f"tasks.map(): the argument columns differ in length ({', '.join(str(len(mv)) for mv in present)})"
                )
            self.columns = [(c, -1, mv) for c, mv in zip(cols, present, strict=True)]
            return
        lists = [
            _tolist(c, mv) if mv is not None else (c if isinstance(c, (list, tuple)) else list(c))
            for c, mv in zip(cols, views, strict=True)
        ]
        if len({len(x) for x in lists}) > 1:
            raise ValueError(
                f"tasks.map(): the argument columns differ in length ({', '.join(str(len(x)) for x in lists)})"
            )
        self.items = list(zip(*lists, strict=True))

    def __len__(self) -> int:
        if self.items is not None:
            return len(self.items)
        return len(self.columns[0][2]) if self.columns else 0

    def as_items(self) -> Sequence[Any]:
        """The items as Python objects (tuples of arguments, or single values)."""
        if self.items is None:
            cols = self.columns or []
            if len(cols) == 1 and cols[0][1] < 0:
                self.items = _tolist(cols[0][0], cols[0][2])
            elif cols[0][1] >= 0:
                self.items = [tuple(row) for row in _tolist(cols[0][0], cols[0][2])]
            else:
                self.items = list(zip(*(_tolist(obj, mv) for obj, _, mv in cols), strict=True))
        return self.items

    def item(self, i: int) -> Any:
        """Item i as passed to the function: a tuple of arguments, or one value."""
        if self.items is not None:
            return self.items[i]
        cols = self.columns or []
        if len(cols) == 1 and cols[0][1] < 0:
            return cols[0][2][i]
        return tuple(mv[i, j] if j >= 0 else mv[i] for _, j, mv in cols)

    def close(self) -> None:
        for mv in self._views:
            mv.release()
        self._views.clear()

    def __enter__(self) -> MapInput:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _tolist(obj: Any, mv: memoryview) -> list:
    """A buffer's items as Python objects; formats memoryview cannot read (numpy object,
    float16, complex or structured arrays) are iterated as the object itself."""
    try:
        return mv.tolist()
    except NotImplementedError:
        return list(obj)


def check_out(out: Any, n: int, return_exceptions: bool) -> None:
    """Refuse an unusable ``out=`` before anything runs."""
    if out is None:
        return
    if return_exceptions:
        raise ValueError(
            "tasks.map(): return_exceptions=True needs the results as a list (out=None): "
            "an array cannot hold exceptions"
        )
    if isinstance(out, str):
        if out != "array":
            raise ValueError(f"tasks.map(): out must be None, 'array' or a writable buffer, got {out!r}")
        return
    try:
        mv = memoryview(out)
    except TypeError:
        raise TypeError(
            f"tasks.map(): out must be None, 'array' or a writable buffer (array.array, numpy array, "
            f"memoryview), got {type(out).__name__}"
        ) from None
    with mv:
        if mv.readonly or mv.ndim != 1 or len(mv) != n or not mv.c_contiguous:
            raise TypeError(
                f"tasks.map(): out must be a writable, contiguous 1-D buffer of {n} items, got "
                f"{'a read-only ' if mv.readonly else ''}{mv.ndim}-D buffer of "
                f"{len(mv) if mv.ndim else 1} items{'' if mv.c_contiguous else ' (not contiguous)'}"
            )


def _native_out(out: Any, rcode: str, n: int, func: Any) -> Any:
    """The buffer the workers write results to: a new array.array for out='array', else out
    itself once its format has been checked."""
    if isinstance(out, str):
        import array

        return array.array(_ARRAY_TYPECODES[rcode], [0]) * n
    with memoryview(out) as mv:
        if _buffer_code(mv, for_out=True) != rcode:
            want = _CODE_FORMATS[rcode] + (" or uint8 (format 'B')" if rcode == "b" else "")
            tc = _ARRAY_TYPECODES[rcode]
            raise TypeError(
                f"tasks.map({func.__qualname__}): its compiled result is {_TYPE_NAMES[rcode]}, so out= "
                f"must hold {want}; the buffer given has format {_format_name(mv)}: pass e.g. "
                f"array.array({tc!r}, bytes({_ITEMSIZES[rcode]} * n)) or out='array'"
            )
    return out


def python_out(results: list[Any], out: Any) -> Any:
    """For Python tasks mapped with out=: the results written to an array (out='array': int64
    when every result is an int, float64 when they are numbers) or into the buffer given."""
    import array

    if isinstance(out, str):
        kinds = {type(v) for v in results}
        if kinds <= {bool}:
            return array.array("B", results) if results else array.array("q")
        if kinds <= {int, bool}:
            return array.array("q", results)
        if kinds <= {int, bool, float}:
            return array.array("d", results)
        bad = next(v for v in results if type(v) not in (int, bool, float))
        raise TypeError(f"tasks.map(): out='array' needs number results, got {type(bad).__name__} {bad!r}")
    with memoryview(out) as mv:
        for i, v in enumerate(results):
            mv[i] = v
    return out


def map_native(
    engine: Any,
    native: NativeTask,
    items: Sequence[Any] | MapInput,
    chunk_size: int | None,
    priority: int,
    return_exceptions: bool,
    _hold_gil: float = 0,
    out: Any = None,
) -> Any:
    """Run func over items (a list or tuple, or a MapInput) as native code, ``chunk_size``
    items per engine node; None when list items do not all fit the signature of the first (the
    caller then runs them as Python tasks). Buffer columns must match the signature exactly
    (TypeError otherwise, before anything runs). ``out``: None (a list), 'array' or a buffer
    (checked by check_out), returned filled."""
    inp = items if isinstance(items, MapInput) else MapInput(items)
    n = len(inp)
    func = native.func
    if inp.columns is not None:
        spec = _buffer_spec(native, inp.columns)
        if spec is None:
            return None
    else:
        lst = inp.items
        assert lst is not None  # noqa: S101 - type narrowing: a MapInput without columns has items
        if n == 0:
            if out is None:
                return []
            if isinstance(out, str):
                spec = (
                    native.spec_for(tuple({"i": int, "f": float, "b": bool}[c] for c in native.annotated))
                    if native.annotated
                    else None
                )
                return _native_out(out, spec.rcode if spec else "i", 0, func)
            return out
        first = lst[0]
        first_args = first if isinstance(first, tuple) else (first,)
        if len(first_args) != native.nparams:
            return None
        spec = native.spec_for(tuple(map(type, first_args)))
        if spec is None:
            return None
    target = None if out is None else _native_out(out, spec.rcode, n, func)
    # a node never covers more than the batch (a huge chunk_size is the whole batch in one node)
    chunk = min(chunk_size, max(n, 1)) if chunk_size else _auto_chunk(n, engine._live_workers())
    if inp.columns is not None:
        cols = tuple((obj, j) for obj, j, _ in inp.columns)
        r = engine._map_native_buffers(spec.address, spec.codes, spec.rcode, cols, chunk, priority, target, _hold_gil)
    else:
        r = engine._map_native(spec.address, spec.codes, spec.rcode, inp.items, chunk, priority, _hold_gil, target)
    if isinstance(r, int):
        log.debug(
            "tasks.map(%s): item %d does not match (%s); the batch runs as Python tasks",
            func.__qualname__,
            r,
            _names(spec.codes),
        )
        return None
    results, failed, cancelled = r
    if failed or cancelled:
        from ._engine import TaskCancelled

        errors: dict[int, BaseException] = {}
        for i in cancelled:
            errors[i] = TaskCancelled(f"tasks.map({func.__qualname__}): item {i} was cancelled (engine shut down)")
        fixed: dict[int, Any] = {}
        for i in failed:
            item = inp.item(i)
            args = item if isinstance(item, tuple) else (item,)
            try:
                fixed[i] = func(*args)  # the real exception comes from the Python function
            except Exception as exc:
                errors[i] = exc
        if fixed:
            if results is not None:
                for i, v in fixed.items():
                    results[i] = v
            else:
                target = _fix_out(target, fixed, out, spec.rcode)
        for i in sorted(errors):
            if return_exceptions:
                results[i] = errors[i]
            else:
                errors[i].add_note(_item_note(func, i, inp.item(i)))
                raise errors[i]
    return results if target is None else target


def _fix_out(target: Any, fixed: dict[int, Any], out: Any, rcode: str) -> Any:
    """Write the results the Python function gave (items native code could not compute) into
    the output buffer. With out='array', one that the compiled result's array cannot hold (0.5
    from an int task, an int beyond int64) gives the array Python tasks get (python_out); a
    buffer of the caller's raises as it does for Python tasks."""
    try:
        with memoryview(target) as mv:
            for i, v in fixed.items():
                mv[i] = v
        return target
    except (TypeError, ValueError):
        if not isinstance(out, str):
            raise
    values = [bool(v) for v in target] if rcode == "b" else list(target)
    for i, v in fixed.items():
        values[i] = v
    return python_out(values, out)


def _buffer_spec(native: NativeTask, columns: list[tuple[Any, int, memoryview]]) -> _Spec | None:
    """The compiled signature that reads these buffer columns as they are, or TypeError saying
    what does not match and how to fix it; None when the function cannot be compiled for
    them (it then runs as Python)."""
    func = native.func
    name = func.__qualname__
    params = func.__code__.co_varnames[: native.nparams]
    if len(columns) != native.nparams:
        shape = "a 1-D buffer gives" if columns[0][1] < 0 else f"a 2-D buffer of {len(columns)} columns gives"
        if len(columns) > 1 and columns[0][1] < 0:
            shape = f"{len(columns)} 1-D buffers give"
        raise TypeError(
            f"tasks.map({name}): {name} takes {native.nparams} arguments, {shape} "
            f"{len(columns)} per item: pass a 2-D buffer of shape (n, {native.nparams}) (one row of "
            f"arguments per item) or one 1-D buffer per argument, tasks.map({name}, "
            f"{', '.join(params) or '...'})"
        )
    codes = ""
    for k, (_, j, mv) in enumerate(columns):
        c = _buffer_code(mv)
        want = native.annotated[k] if native.annotated else None
        if c is None or (want is not None and c != want):
            where = f"argument {k} ({params[k]!r})" + (f", column {j} of the 2-D buffer" if j >= 0 else "")
            if want is not None:
                need = f"is compiled for {_CODE_FORMATS[want]}"
                fix = {
                    "i": "array.array('q', ...) or arr.astype(numpy.int64)",
                    "f": "array.array('d', ...) or arr.astype(numpy.float64)",
                    "b": "arr.astype(numpy.bool_)",
                }[want]
            else:
                need = "reads int64 (format 'q'), float64 ('d') or bool ('?') buffers"
                fix = "array.array('q' or 'd', ...) or arr.astype(numpy.int64 or numpy.float64)"
            if j >= 0 and want is not None and c is not None:
                fix += "; for arguments of different types pass one 1-D buffer per argument"
            raise TypeError(
                f"tasks.map({name}): {where}: the buffer holds {_format_name(mv)} items, {name} {need}: "
                f"convert it, e.g. {fix}"
            )
        codes += c
    return native.spec_for(tuple({"i": int, "f": float, "b": bool}[c] for c in codes))


_NOTE_REPR = reprlib.Repr()
_NOTE_REPR.maxstring = _NOTE_REPR.maxother = 120


def refuse_batch(native: NativeTask, inp: MapInput, plain: bool) -> None:
    """compile_to_c="require" and tasks.map could not run the batch natively: raise the
    CompileError that says why (a map never runs a required task as Python)."""
    name = native.func.__qualname__
    if not plain:
        native.refuse("tasks.map runs a task with retries, a timeout or hooks as one Python task per item")
    for i in range(len(inp)):
        item = inp.item(i)
        try:
            native.prepare(item if isinstance(item, tuple) else (item,), None, wait=True)
        except CompileError as exc:
            exc.add_note(f"tasks.map({name}): item {i} {item!r}")
            raise
    native.refuse("the batch's items do not all fit one compiled signature")


def _item_note(func: Any, i: int, item: Any) -> str:
    """The note a failed item's error gets. Its repr is shortened (a 10 MB item must not make
    a 10 MB note), and one that raises must not replace the task's own error."""
    try:
        text = _NOTE_REPR.repr(item)
    except Exception:  # noqa: BLE001 - any broken __repr__
        text = f"<{type(item).__qualname__} object: repr() failed>"
    return f"tasks.map({getattr(func, '__qualname__', func)}): item {i} {text} failed"


# Python tasks of one map are queued MAP_STEP at a time with at most MAP_WINDOW in flight: the
# nodes and handles of a huge batch are never all alive at once (the node slab keeps what it
# grows to), and the workers always have MAP_WINDOW - MAP_STEP items queued ahead of the one
# being waited for.
MAP_STEP = 1024
MAP_WINDOW = 4 * MAP_STEP


def map_python(
    submit: Callable[[Sequence[Any], list[Any]], None], items: Sequence[Any], func: Any, return_exceptions: bool
) -> list[Any]:
    """The results, in order, of ``func`` over items run as Python tasks: ``submit(part, handles)``
    queues a slice of items, appending each one's handle to ``handles`` as it is queued (so what
    a submission that fails part-way queued is known, and cancelled). As concurrent.futures' map: when this raises
    (the first failure without return_exceptions, Ctrl-C, a failed submission), what has not
    started is cancelled and what has not been queued never is."""
    n = len(items)
    out: list[Any] = []
    inflight: deque[list[Any]] = deque()
    queued = 0

    def more() -> None:
        nonlocal queued
        hi = min(n, queued + MAP_STEP)
        part: list[Any] = []
        inflight.append(part)  # first: a submission that fails part-way has queued some of it
        submit(items[queued:hi], part)
        queued = hi

    try:
        while queued < n and queued - len(out) < MAP_WINDOW:
            more()
        while inflight:
            part = inflight[0]
            for k, h in enumerate(part):
                try:
                    out.append(h.wait())
                except Exception as exc:
                    if not return_exceptions:
                        exc.add_note(_item_note(func, len(out), items[len(out)]))
                        raise
                    out.append(exc)
                part[k] = None  # the node goes back to the slab once its value is taken
            inflight.popleft()
            while queued < n and queued - len(out) < MAP_WINDOW:
                more()
    except BaseException:
        for part in inflight:
            for h in part:
                # not a running one (a thread task would see cancel_requested, an isolated one
                # would be killed): _cancel_queued decides that atomically
                if h is not None:
                    h._cancel_queued()
        raise
    return out
