"""The compiled trampolines' disk cache: where it is, the key of an entry (everything numba
compiles into it), its trust rules (ownership, permissions, no symlink on the way, no FIFO
opened, numba's files checked against our manifest), atomic writes, and loading a trampoline
from it or in memory. The rules are in the comment below; docs/compiling.md ("The disk cache")
and SECURITY.md say what they protect against."""

from __future__ import annotations

import builtins
import hashlib
import json
import marshal
import os
import stat as stat_mod
import sys
import tempfile
import threading
import types
from typing import Any

from ._common import _Cannot, _first_lines, _global_names, _is_numba_dispatcher, log
from .rewrite import _rewrite


def _template_version() -> str:
    # the generated code calls _checked.py's operations, and a cache hit skips the checks of
    # numba's typing that this package makes (_maybe_unbound, _mixed_kinds): a change in any of
    # its files is a new cache entry
    h = hashlib.sha256()
    here = os.path.dirname(os.path.abspath(__file__))
    for name in sorted(n for n in os.listdir(here) if n.endswith(".py")):
        h.update(name.encode() + b"\0")
        with open(os.path.join(here, name), "rb") as f:
            h.update(f.read())
    return "4-" + h.hexdigest()[:16]


_TEMPLATE_VERSION = _template_version()


def _cache_dir() -> str:
    d = os.environ.get("CATZILLA_TASKS_CACHE_DIR")
    if not d:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        d = os.path.join(base, "catzilla_tasks", "compiled")
    return d


# ---------------------------------------------------------------------------------------
# The disk cache's trust rules (see SECURITY.md). What is loaded from the cache is code that
# runs in this process, so nothing in it is used unless only this user could have written it:
# the directory is ours and writable by nobody else (and so are its ancestors, or they are
# sticky like /tmp); a file is ours, a regular file, writable by nobody else; the trampoline's
# text equals the text we generate (we compile our text, never the file's); numba's index and
# data files (pickles) have the SHA-256 recorded in our manifest when we saw numba write them.
# Anything else is deleted and compiled afresh; a directory that fails the rules is not used
# at all (a warning, once, and compiled code stays in memory).

_MEMORY = "m"  # prefix of the keys of functions that are never cached on disk (see _key)
_DIR_VERDICTS: dict[str, str | None] = {}  # cache directory -> its real path, or None: refused
_TRUSTED_DIRS: set[str] = set()  # real paths our numba cache locator serves
_cache_lock = threading.Lock()


def _warn_cache(d: str, why: str) -> None:
    import warnings

    warnings.warn(
        f"catzilla_tasks: the compile cache {d!r} is not used: {why}; compiled tasks are compiled "
        "in memory by this process (see SECURITY.md)",
        RuntimeWarning,
        stacklevel=2,
    )


def _dir_problem(path: str, uid: int, leaf: bool) -> str | None:
    st = os.lstat(path)  # not stat: a symlink (``__pycache__`` -> elsewhere) leads out of what was checked
    if stat_mod.S_ISLNK(st.st_mode):
        return f"{path} is a symlink (to {os.readlink(path)!r})"
    if not stat_mod.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    mode = stat_mod.S_IMODE(st.st_mode)
    if leaf:
        if st.st_uid != uid:
            return f"{path} is owned by uid {st.st_uid}, not by this user (uid {uid})"
        if mode & 0o022:
            who = " and ".join(w for w, bit in (("its group", 0o020), ("other users", 0o002)) if mode & bit)
            return f"{path} is writable by {who} (mode {mode:o}; it must be 0700 or 0755)"
        return None
    # an ancestor: others must not be able to rename our directory away and plant another one
    if st.st_uid not in (0, uid) or (mode & 0o022 and not mode & stat_mod.S_ISVTX):
        return (
            f"its parent {path} (owner uid {st.st_uid}, mode {mode:o}) can be changed by other users "
            "(it must belong to this user or root, and be sticky if others may write to it)"
        )
    return None


def _makedirs_private(path: str) -> None:
    """os.makedirs(path), every directory it creates 0700: os.makedirs gives the parents it
    creates the umask's mode (0775 under umask 002), which the ancestors' rule then refuses."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    if parent != path and not os.path.isdir(parent):
        _makedirs_private(parent)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not os.path.isdir(path):
            raise


def _path_problem(path: str, uid: int, created: bool) -> str | None:
    """Why the way to path cannot be trusted, or None: each directory it goes through must pass
    the ancestors' rule (others cannot rename what is in it), and each symlink on the way (or on
    the way of a symlink's target) must belong to this user or root. Otherwise another user
    chose where the cache is (a /tmp/name planted before we created it, a link in a directory
    they may write to); the checks after realpath() see only the target. A missing part is one
    we are about to create, unless ``created``."""
    todo = [c for c in os.path.abspath(path).split(os.sep) if c]
    cur, hops = os.sep, 0
    while todo:
        comp = todo.pop(0)
        if comp in (".", ""):
            continue
        if comp == "..":
            cur = os.path.dirname(cur)
            continue
        why = _dir_problem(cur, uid, leaf=False)
        if why:
            return why
        nxt = os.path.join(cur, comp)
        try:
            st = os.lstat(nxt)
        except FileNotFoundError:
            return f"{nxt} vanished while it was being created" if created else None
        if not stat_mod.S_ISLNK(st.st_mode):
            cur = nxt
            continue
        if st.st_uid not in (0, uid):
            return f"{nxt} is a symlink of another user (uid {st.st_uid})"
        hops += 1
        if hops > 40:
            return f"{path} has too many levels of symlinks"
        target = os.readlink(nxt)
        if os.path.isabs(target):
            cur = os.sep
        todo[:0] = target.split(os.sep)
    return None


def _trusted_dir(d: str) -> str | None:
    """The real path of cache directory d, created 0700, when it passes the trust rules and is
    writable; None otherwise (with a warning, once per directory and process)."""
    with _cache_lock:
        if d in _DIR_VERDICTS:
            return _DIR_VERDICTS[d]
        real = ""  # set (and used) only while why is None
        try:
            why = _numba_cache_redirected()
            if why is None:
                uid = os.geteuid()
                why = _path_problem(d, uid, created=False)  # before makedirs follows the way
                if why is None:
                    _makedirs_private(d)
                    why = _path_problem(d, uid, created=True)
                if why is None:
                    real = os.path.realpath(d)
                    why = _dir_problem(real, uid, leaf=True)
                parent = real
                while why is None and os.path.dirname(parent) != parent:
                    parent = os.path.dirname(parent)
                    why = _dir_problem(parent, uid, leaf=False)
                if why is None:
                    pyc = os.path.join(real, "__pycache__")  # numba's files, the same rules
                    os.makedirs(pyc, mode=0o700, exist_ok=True)
                    why = _dir_problem(pyc, uid, leaf=True)
                    for folder in (real, pyc):  # writable (not just permitted: read-only mounts)
                        tempfile.TemporaryFile(dir=folder).close()
        except OSError as exc:
            why = f"it cannot be created or written ({type(exc).__name__}: {exc})"
        if why is not None:
            _warn_cache(d, why)
            _DIR_VERDICTS[d] = None
            return None
        _TRUSTED_DIRS.add(real)
        _install_locator()
        _DIR_VERDICTS[d] = real
        return real


def _numba_cache_redirected() -> str | None:
    from numba.core import config

    if getattr(config, "CACHE_LOCATOR_CLASSES", ""):
        return "NUMBA_CACHE_LOCATOR_CLASSES is set, so numba would keep its files where they cannot be checked"
    return None


_LOCATOR: Any = None


def _install_locator() -> None:
    """Make numba cache our trampolines in ``<dir>/__pycache__`` of a trusted directory, and
    nowhere else (not NUMBA_CACHE_DIR, not ~/.cache/numba): numba's own locators are tried
    after ours, and ours answers only for the ``ct_*.py`` files of a trusted directory."""
    global _LOCATOR
    if _LOCATOR is not None:
        return
    from numba.core import caching

    class _TrustedLocator(caching._SourceFileBackedLocatorMixin, caching._CacheLocator):
        def __init__(self, py_func: Any, py_file: str) -> None:
            self._py_file = py_file
            self._lineno = py_func.__code__.co_firstlineno
            self._cache_path = os.path.join(os.path.dirname(py_file), "__pycache__")

        def get_cache_path(self) -> str:
            return self._cache_path

        @classmethod
        def from_function(cls, py_func: Any, py_file: str) -> Any:
            if os.path.dirname(py_file) in _TRUSTED_DIRS and os.path.basename(py_file).startswith("ct_"):
                return cls(py_func, py_file)
            return None

    # numba's extension point is this list of locator classes (NUMBA_CACHE_LOCATOR_CLASSES
    # replaces it process-wide, for every user of numba): ours goes first, for our files only.
    impl = caching.CompileResultCacheImpl
    impl._locator_classes = [_TrustedLocator, *impl._locator_classes]
    _LOCATOR = _TrustedLocator


def _trusted_read(path: str) -> bytes | None:
    """The bytes of path when it is a regular file of ours that nobody else may write, else None."""
    try:
        # O_NONBLOCK: a FIFO in the cache would block open() before fstat could refuse it
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat_mod.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            return None
        return f.read()


def _numba_files(pyc: str, key: str) -> list[str]:
    try:
        names = os.listdir(pyc)
    except OSError:
        return []
    return sorted(n for n in names if n.startswith(f"ct_{key}.") and n.endswith((".nbi", ".nbc")))


def _check_numba_files(pyc: str, key: str, recorded: dict[str, str]) -> None:
    """Leave numba's files of key only if each is one we recorded; else delete them all (numba
    then compiles afresh and writes new ones). OSError when they cannot be deleted."""
    names = _numba_files(pyc, key)
    for n in names:
        data = _trusted_read(os.path.join(pyc, n))
        if data is None or hashlib.sha256(data).hexdigest() != recorded.get(n):
            break
    else:
        return
    for n in names:
        try:
            os.remove(os.path.join(pyc, n))
        except FileNotFoundError:
            pass


def _record_numba_files(pyc: str, key: str) -> dict[str, str]:
    """The SHA-256 of numba's files of key, as written by numba in this process (made private
    first: numba creates them with the umask's mode)."""
    out = {}
    for n in _numba_files(pyc, key):
        p = os.path.join(pyc, n)
        try:
            os.chmod(p, 0o600, follow_symlinks=False)
        except (OSError, NotImplementedError):
            continue
        data = _trusted_read(p)
        if data is not None:
            out[n] = hashlib.sha256(data).hexdigest()
    return out


def _read_meta(d: str, key: str) -> dict[str, Any]:
    data = _trusted_read(os.path.join(d, f"ct_{key}.json"))
    try:
        meta = json.loads(data) if data is not None else {}
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


# Modules whose attributes numba may freeze into machine code and that change only with their
# version (in the key): others' attributes (a settings module) make a function uncacheable.
_FROZEN_MODULES = frozenset({"math", "cmath", "numpy", "numba"})
_HASHABLE_CONSTANTS = (bool, int, float, complex, str, bytes, type(None))


def _fingerprint(func: types.FunctionType, h: Any, seen: set[int]) -> str | None:
    """Feed h with everything numba compiles of func: its code (nested code included), defaults,
    closure values and the globals it loads, recursing into numba helpers. None when all of it
    could be hashed, else what could not."""
    if id(func) in seen:  # recursion
        return None
    seen.add(id(func))
    code = func.__code__
    # marshal format 0: no reference or interning flags, which follow reference counts (numba
    # holding a code's constants would change the bytes of later formats, and so the key)
    h.update(marshal.dumps(code, 0))
    why = _fingerprint_value("a default", (func.__defaults__, tuple(sorted((func.__kwdefaults__ or {}).items()))), h)
    if why:
        return why
    for name, cell in zip(code.co_freevars, func.__closure__ or (), strict=True):
        try:
            value = cell.cell_contents
        except ValueError:
            return f"its closure variable {name!r} is not set"
        why = _fingerprint_global(f"closure variable {name!r}", value, h, seen)
        if why:
            return why
    for name in sorted(_global_names(code)):
        h.update(f"global {name}=".encode())
        if name in func.__globals__:
            why = _fingerprint_global(f"global {name!r}", func.__globals__[name], h, seen)
            if why:
                return f"{func.__qualname__} reads {why}"
        elif not hasattr(builtins, name):
            h.update(b"<undefined>")
    return None


def _fingerprint_global(what: str, value: Any, h: Any, seen: set[int]) -> str | None:
    if isinstance(value, types.ModuleType):
        top = value.__name__.partition(".")[0]
        if top not in _FROZEN_MODULES:
            return f"{what}, the module {value.__name__!r}, whose attributes numba freezes"
        h.update(f"module {value.__name__}".encode())
        return None
    if _is_numba_dispatcher(value):
        opts = getattr(value, "targetoptions", {})
        # A dispatcher given explicit signatures (@njit("int64(float64)")) compiles only those,
        # converting its arguments and result to them: they are part of what it computes. (The
        # signatures of a lazy one are what this process happened to call, so not hashed.)
        sigs = [] if getattr(value, "_can_compile", True) else sorted(map(str, value.nopython_signatures))
        h.update(f"dispatcher {sorted(opts.items())!r} {sigs!r}".encode())
        return _fingerprint(value.py_func, h, seen)
    if isinstance(value, type) and value.__module__ == "builtins":
        h.update(f"builtin {value.__qualname__}".encode())
        return None
    return _fingerprint_value(what, value, h)


def _fingerprint_value(what: str, value: Any, h: Any) -> str | None:
    """Hash a constant numba freezes: numbers, strings, None, tuples of them, numpy arrays."""
    if type(value) in _HASHABLE_CONSTANTS:
        h.update(f"{type(value).__name__} {value!r};".encode())
        return None
    if type(value) is tuple:
        h.update(f"tuple {len(value)}(".encode())
        for v in value:
            why = _fingerprint_value(what, v, h)
            if why:
                return why
        h.update(b")")
        return None
    if type(value).__module__ == "numpy" and hasattr(value, "dtype") and hasattr(value, "tobytes"):
        h.update(f"numpy {value.dtype.str} {getattr(value, 'shape', ())!r}".encode())
        h.update(value.tobytes())
        return None
    return f"{what} ({type(value).__name__}), a value numba freezes that the cache key cannot cover"


def _cache_key(func: types.FunctionType, codes: str, template: str) -> str:
    """The cache key of func's trampoline for these argument types: a hash of everything
    numba compiles into it (the checked rewrite of the function's source, its code, every
    numba helper it reaches, callees of callees included, and every global and closure
    value numba freezes as a constant), the trampoline's ``template``, this package's files
    (``_checked.py`` included), and the numba, numpy and Python versions. A function reaching
    a value that cannot be hashed gets a key of this process only (prefix _MEMORY): it is
    compiled, never loaded from or stored on disk."""
    import numba
    import numpy

    h = hashlib.sha256()
    for part in (_TEMPLATE_VERSION, template, codes, numba.__version__, numpy.__version__, sys.version):
        h.update(part.encode())
        h.update(b"\0")
    # numba compiles the checked rewrite of func's source, not its bytecode: two sources of
    # the same bytecode (2**62 and 4**31) are rewritten differently (_Cannot: no source)
    h.update(marshal.dumps(_rewrite(func), 0))
    why = _fingerprint(func, h, set())
    if why is None:
        return h.hexdigest()[:32]
    log.debug("%s is not cached on disk: %s", func.__qualname__, why)
    h.update(f"process {os.getpid()} function {id(func)}".encode())  # _REGISTRY keeps func alive
    return _MEMORY + h.hexdigest()[:31]


def _load_trampoline(path: str | None, key: str, src: str) -> Any:
    """Run the trampoline module's text ``src`` (ours, never the file's) and return its cfunc:
    with numba's disk cache beside ``path``, or in memory only when path is None."""
    name = f"catzilla_tasks_native_{key}"
    if path is None:
        text = src.replace("cache=True", "cache=False")
        if text.count("cache=False") != 1:
            raise RuntimeError("the trampoline template has no single cache=True to turn off")
        code = builtins.compile(text, f"<catzilla_tasks native {key}>", "exec")
    else:
        code = builtins.compile(src, path, "exec")
    mod = types.ModuleType(name)
    mod.__file__ = path or code.co_filename
    sys.modules[name] = mod  # numba's cache finds the module by its name
    try:
        exec(code, mod.__dict__)  # noqa: S102 - the text generated by _build, see _TRAMPOLINE
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return mod.trampoline


def _load_cached(d: str, key: str, src: str, rcode: str, qualname: str, meta: dict[str, Any]) -> Any:
    """The trampoline of key from trusted cache directory d (numba's cache loaded, or written
    there), or None when the directory cannot be used (warned once; compile in memory)."""
    path = os.path.join(d, f"ct_{key}.py")
    pyc = os.path.join(d, "__pycache__")
    try:
        if _trusted_read(path) != src.encode():
            _atomic_write(path, src)
        files = meta.get("numba")
        _check_numba_files(pyc, key, files if isinstance(files, dict) else {})
        try:
            cf = _load_trampoline(path, key, src)
        except OSError:
            raise
        except Exception:
            # an entry this numba cannot load: compile afresh once
            log.debug("compile cache entry %s unusable; compiling again", path, exc_info=True)
            _drop_cache_entry(d, key)
            _atomic_write(path, src)
            try:
                cf = _load_trampoline(path, key, src)
            except OSError:
                raise
            except Exception as exc:
                raise _Cannot(f"numba cannot compile it: {_first_lines(exc)}") from None
        want = {"result": rcode, "function": qualname, "numba": _record_numba_files(pyc, key)}
        if meta != want:
            _atomic_write(os.path.join(d, f"ct_{key}.json"), json.dumps(want))
        return cf
    except OSError as exc:
        with _cache_lock:
            _DIR_VERDICTS[d] = None
            for k, v in list(_DIR_VERDICTS.items()):
                if v == d:
                    _DIR_VERDICTS[k] = None
        _warn_cache(d, f"it cannot be written ({type(exc).__name__}: {exc})")
        return None


def _drop_cache_entry(d: str, key: str) -> None:
    for folder in (d, os.path.join(d, "__pycache__")):
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for fn in names:
            if fn.startswith(f"ct_{key}.") and not fn.endswith(".json"):
                try:
                    os.remove(os.path.join(folder, fn))
                except OSError:
                    pass


def _atomic_write(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
