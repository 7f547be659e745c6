"""Attacks on the trust boundaries of issue 14 (and issue 16, items 2-3): each test is a way
around a check that the first round of fixes let through."""

import os
import stat
import threading
import warnings

import pytest

from catzilla_tasks._redact import redact_text, redact_url

ROOT = os.geteuid() == 0


def _cache_warnings(record):
    return [w for w in record if issubclass(w.category, RuntimeWarning) and "compile cache" in str(w.message)]


def _tree(d):
    return sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs)


# ---- the compile cache ------------------------------------------------------------------

@pytest.fixture
def numba():
    return pytest.importorskip("numba")


def _poly(x: float, n: int) -> float:
    s = 0.0
    for k in range(n):
        s = s * x + k
    return s


_SIG_APP = "import numba\n@numba.njit({sig})\ndef h(x):\n    return x * 1.5\ndef top(x: float):\n    return h(x)\n"


def _sig_variant(sig, module, path):
    """top(x) calling a helper compiled eagerly for an explicit signature: the same code, file
    and line whatever the signature (a deploy that changes only the decorator's argument: the
    file is rewritten, and imported again as another module)."""
    import importlib.util

    path.write_text(_SIG_APP.format(sig=sig))
    spec = importlib.util.spec_from_file_location(module, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.top


def test_key_covers_a_helpers_explicit_signature(numba, tmp_path, monkeypatch):
    """A helper declared @njit("int64(float64)") truncates; @njit("float64(float64)") does
    not. Same bytecode, so before: the same key, and the second function got the first's
    machine code (4 instead of 4.5), in this process and from the disk cache in the next."""
    import sys

    from catzilla_tasks import BackgroundTasks, task
    from catzilla_tasks.compiler import TaskCompiler

    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # the second import reads the new text
    app = tmp_path / "sig_app.py"
    as_int = _sig_variant('"int64(float64)"', "sig_app_int", app)
    as_float = _sig_variant('"float64(float64)"', "sig_app_float", app)
    assert (as_int(3.0), as_float(3.0)) == (4, 4.5)
    assert TaskCompiler()._key(as_int, "f") != TaskCompiler()._key(as_float, "f")

    monkeypatch.setenv("CATZILLA_TASKS_CACHE_DIR", str(tmp_path / "cache"))
    task(as_int)
    task(as_float)
    from catzilla_tasks import compiler

    assert compiler.precompile(as_int, (float,)) is None
    assert compiler.precompile(as_float, (float,)) is None
    with BackgroundTasks(workers=1, min_workers=1, enable_auto_scaling=False) as t:
        first = t.add_task(as_int, 3.0)
        assert first.wait(120) == 4 and first.get_stats()["native"]
        second = t.add_task(as_float, 3.0)
        assert second.wait(120) == 4.5 and second.get_stats()["native"]


def test_symlinked_pycache_cannot_lead_numba_out_of_the_cache(numba, tmp_path):
    """numba's pickles go to <cache>/__pycache__. A symlink there (left from a time the cache
    was shared, say) pointing into a directory others can write to passed the check (os.stat
    follows it), so the pickles numba loads lived where another user can swap them."""
    from catzilla_tasks.compiler import TaskCompiler

    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)                      # others may rename and replace what is in it
    elsewhere = shared / "pyc"
    elsewhere.mkdir(mode=0o700)
    d = tmp_path / "cache"
    d.mkdir(mode=0o700)
    os.symlink(elsewhere, d / "__pycache__")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        spec = TaskCompiler(str(d)).compile(_poly, "fi")
    assert spec.address and not spec.cache_hit
    assert _tree(str(elsewhere)) == []          # nothing written to (or read from) there
    msgs = [str(w.message) for w in _cache_warnings(rec)]
    assert len(msgs) == 1 and "symlink" in msgs[0], msgs


@pytest.mark.timeout(120)
def test_fifo_in_the_cache_does_not_hang_compilation(numba, tmp_path):
    """A FIFO where the manifest should be (a leftover of a shared cache): reading it blocked
    the compiling thread for ever (open() before the fstat check)."""
    from catzilla_tasks.compiler import TaskCompiler

    d = tmp_path / "cache"
    d.mkdir(mode=0o700)
    c = TaskCompiler(str(d))
    fifo = d / f"ct_{c._key(_poly, 'fi')}.json"
    os.mkfifo(fifo, 0o600)
    done = threading.Event()
    result = {}

    def run():
        try:
            result["spec"] = c.compile(_poly, "fi")
        except BaseException as exc:  # reported below
            result["error"] = exc
        done.set()

    threading.Thread(target=run, daemon=True).start()
    finished = done.wait(60)
    if not finished:  # unblock the reader so the thread ends
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        done.wait(30)
    assert finished, "compile() blocked on a FIFO in the cache directory"
    assert "error" not in result, result
    assert result["spec"].address
    assert stat.S_ISREG(os.lstat(fifo).st_mode)  # replaced by our manifest


# ---- redaction ----------------------------------------------------------------------------

# Passwords written into a URL without percent-encoding one of '/', '?', '#' (a base64
# password has '/'): the RFC 3986 parse ends the authority there, finds no '@' in it and showed
# the password (all of it, or the part before the character).
UNENCODED = [
    ("redis://:Zm9v/YmFy+cXV4==@cache.internal:6379/0", ["Zm9v", "YmFy", "cXV4"], "cache.internal:6379/0"),
    ("redis://alice:p#ss-W0rd@cache.internal:6379/0", ["p#ss", "W0rd"], "cache.internal:6379/0"),
    ("rediss://alice:p?ss-W0rd@cache.internal:6380/1", ["p?ss", "W0rd"], "cache.internal:6380/1"),
    ("redis+sentinel://:Zm9v/YmFy@s1:26379,s2:26379/mymaster", ["Zm9v", "YmFy"], "s1:26379,s2:26379/mymaster"),
    # no host at all: what follows ':' is no port
    ("redis://:hunter2-Pw", ["hunter2"], "redis://:"),
]


@pytest.mark.parametrize("url,secrets,kept", UNENCODED)
def test_unencoded_reserved_characters_in_a_password_are_masked(url, secrets, kept):
    for shown in (redact_url(url), redact_text(f"cannot connect to {url} (refused)")):
        assert not [s for s in secrets if s in shown], shown
        assert kept in shown and "***" in shown
    assert redact_url(redact_url(url)) == redact_url(url)


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "redis://[::1]:6379/0", "unix:///tmp/r.sock?db=1",
                                 "redis+sentinel://s1:26379,s2:26379/m", "https://h.example/@me/x?q=a@b",
                                 "http://h.example:8080", "redis://host/0#a/b@c"])
def test_urls_without_userinfo_are_left_alone(url):
    assert redact_url(url) == url


def test_broker_errors_from_redis_py_do_not_quote_the_password():
    """redis-py's own parse error quoted the piece of the password it took for a port."""
    pytest.importorskip("redis")
    from catzilla_tasks.brokers.redis import RedisBroker

    for url in ("redis://:Zm9v/YmFy@localhost:6379/0", "redis://u:p#ss-W0rd@localhost:6379/0",
                "foo://:Zm9v/YmFy@localhost/0"):
        with pytest.raises(ValueError) as ei:
            RedisBroker(url)
        msg = str(ei.value)
        assert "Zm9v" not in msg and "YmFy" not in msg and "p#ss" not in msg and "'p'" not in msg, msg
        assert "broker URL" in msg


def test_secret_query_parameters_outside_a_full_url_are_masked():
    """An HTTP client's error quotes the request path without scheme and host
    ("Max retries exceeded with url: /v1/x?auth=..."): the parameters named like secrets in
    a URL were masked only when one of the words of the libpq-style pairs matched."""
    msg = "Max retries exceeded with url: /v1/jobs?auth=AAA111&sig=BBB222&key=CCC333&session=DDD444&page=2"
    out = redact_text(msg)
    assert not [s for s in ("AAA111", "BBB222", "CCC333", "DDD444") if s in out], out
    assert "page=2" in out and "/v1/jobs?" in out


def test_secrets_in_a_dict_or_json_repr_are_masked():
    """An error that quotes its settings: {'password': '...'} or {"token": "..."}."""
    for text in ("cannot connect with {'host': 'db', 'password': 'hunter2-Pw'}",
                 'bad config {"host": "db", "api_key": "hunter2-Pw", "port": 5432}',
                 "kwargs={'token': b'hunter2-Pw'}"):
        out = redact_text(text)
        assert "hunter2" not in out and "***" in out, out
    assert redact_text("{'host': 'db', 'port': 1}") == "{'host': 'db', 'port': 1}"


# ---- the dashboard ------------------------------------------------------------------------

def _raw_request(server, request: bytes) -> tuple[int, bytes]:
    import socket

    with socket.create_connection(server.server_address[:2], timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _stats():
    return {"engine": {"name": "attack-test"}, "queue_metrics": {}, "totals": {}, "recent_failures": []}


def test_absolute_form_request_target_is_the_host_that_counts():
    """RFC 9112 3.2.2: with an absolute-form target the server uses its authority, not Host.
    The loopback rule looked only at the Host header, and the handler routed on the target's
    path: `GET http://attacker.example/stats.json` with `Host: 127.0.0.1` was served."""
    from catzilla_tasks.dashboard import serve

    srv, _ = serve(_stats)
    try:
        port = srv.server_address[1]
        status, body = _raw_request(srv, b"GET http://attacker.example/stats.json HTTP/1.1\r\n"
                                         b"Host: 127.0.0.1:%d\r\nConnection: close\r\n\r\n" % port)
        assert status == 403 and b"attack-test" not in body
        # an absolute-form target naming the loopback server itself is fine
        status, body = _raw_request(srv, b"GET http://127.0.0.1:%d/stats.json HTTP/1.1\r\n"
                                         b"Host: 127.0.0.1:%d\r\nConnection: close\r\n\r\n" % (port, port))
        assert status == 200 and b"attack-test" in body
    finally:
        srv.stop()


def test_token_rule_is_decided_by_the_address_bound_not_the_name(monkeypatch):
    """serve(host="localhost") needed no token because of the name; what it binds is what the
    resolver says (a *.localhost name is looked up in DNS by glibc). Here the bind lands on
    every interface, as a resolver mapping the name elsewhere would make it: no token, no server."""
    import socketserver

    from catzilla_tasks.dashboard import serve

    real_bind = socketserver.TCPServer.server_bind

    def bind_everywhere(self):
        self.server_address = ("0.0.0.0", 0)
        real_bind(self)

    monkeypatch.setattr(socketserver.TCPServer, "server_bind", bind_everywhere)
    srv = None
    try:
        with pytest.raises(ValueError, match="token"):
            srv, _ = serve(_stats, host="localhost")
    finally:
        if srv is not None:
            srv.stop()
    srv, _ = serve(_stats, host="localhost", token="tok-3")   # with a token it may
    try:
        assert srv.server_address[0] == "0.0.0.0" and not srv.loopback
    finally:
        srv.stop()


@pytest.mark.timeout(180)
def test_cli_proxy_prints_a_url_whose_token_works():
    """--serve-token with characters a query gives another meaning ('+' is a space, '&' ends
    the value, '#' starts the fragment) was printed unencoded: the URL shown, opened, sent
    another token and got 401."""
    import queue
    import signal
    import subprocess
    import sys
    from urllib.parse import parse_qs, urlsplit

    from http_helpers import get

    from catzilla_tasks.dashboard import serve

    remote, _ = serve(_stats, token="remote-tok")
    tok = "a+b&c=d#e f%"
    proc = subprocess.Popen([sys.executable, "-m", "catzilla_tasks.cli", "dashboard", remote.url, "--port", "0",
                             "--token", "remote-tok", "--serve-token", tok], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        first = lines.get(timeout=60)
        url = first.split(" at ", 1)[1].split()[0]
        parts = urlsplit(url)
        assert not parts.fragment and parse_qs(parts.query) == {"token": [tok]}, url
        status, _, _ = get(f"{parts.scheme}://{parts.netloc}/stats.json?{parts.query}")
        assert status == 200
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        remote.stop()


# ---- the worker's import path -------------------------------------------------------------

_SHARED_APP = """
import os, sys
os.chdir({d!r})
from catzilla_tasks.brokers.commands import UsageError, load_app
try:
    load_app("sharedjobs:tasks")
except UsageError as exc:
    print("refused", exc)
    raise SystemExit(0)
try:
    import catzilla_optional_extra  # an optional dependency that is not installed, imported later
except ImportError:
    pass
print("loaded")
"""


@pytest.mark.parametrize("mode", [0o1777, 0o777, 0o1770])
def test_worker_refuses_to_import_from_a_directory_others_can_add_files_to(tmp_path, mode):
    """cwd appended last shadows nothing installed, but it still supplies every module that is
    not installed: an optional dependency a library tries (uvloop, for the engine's event loop)
    planted in a shared directory such as /tmp ran in the worker."""
    import subprocess
    import sys

    d = tmp_path / "shared"
    d.mkdir()
    marker = tmp_path / "PLANTED-RAN"
    (d / "sharedjobs.py").write_text("tasks = 'the app'\n")
    (d / "catzilla_optional_extra.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    os.chmod(d, mode)
    p = subprocess.run([sys.executable, "-P", "-c", _SHARED_APP.format(d=str(d))], capture_output=True, text=True,
                       timeout=120, cwd=str(d))
    assert p.returncode == 0, p.stderr + p.stdout
    assert not marker.exists(), p.stdout
    assert p.stdout.startswith("refused") and "PYTHONPATH" in p.stdout, p.stdout
    # the explicit way still works: PYTHONPATH names the directory
    p = subprocess.run([sys.executable, "-P", "-c", _SHARED_APP.format(d=str(d))], capture_output=True, text=True,
                       timeout=120, cwd=str(d),
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(d), os.environ.get("PYTHONPATH", "")])))
    assert p.stdout.strip() == "loaded", p.stderr + p.stdout


def test_worker_imports_from_a_directory_of_its_own(tmp_path):
    import subprocess
    import sys

    d = tmp_path / "mine"
    d.mkdir(mode=0o775)   # group-writable, no sticky bit: the group could edit the app itself
    os.chmod(d, 0o775)
    (d / "sharedjobs.py").write_text("tasks = 'the app'\n")
    p = subprocess.run([sys.executable, "-P", "-c", _SHARED_APP.format(d=str(d))], capture_output=True, text=True,
                       timeout=120, cwd=str(d))
    assert p.stdout.strip() == "loaded", p.stderr + p.stdout


def test_cache_path_through_another_users_symlink_is_refused(numba, tmp_path):
    """CATZILLA_TASKS_CACHE_DIR=/tmp/x (a shared, sticky directory): another user creates
    /tmp/x first, as a symlink to a directory of ours they chose. realpath() resolved it and
    every check passed on the target (ours, 0700), so they decided where we write (the kernel's
    protected_symlinks, when on, stops only the kernel's own following, not realpath's)."""
    if not ROOT:
        pytest.skip("needs root to create a symlink owned by another user")
    from catzilla_tasks.compiler import TaskCompiler

    shared = tmp_path / "tmp"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    chosen = tmp_path / "one-of-ours"
    chosen.mkdir(mode=0o700)
    link = shared / "ctcache"
    os.symlink(chosen, link)
    os.lchown(link, 65534, 65534)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        spec = TaskCompiler(str(link)).compile(_poly, "fi")
    assert spec.address and not spec.cache_hit
    assert _tree(str(chosen)) == []
    msgs = [str(w.message) for w in _cache_warnings(rec)]
    assert len(msgs) == 1 and "symlink" in msgs[0], msgs


def test_cache_path_through_our_own_symlink_is_used(numba, tmp_path):
    from catzilla_tasks.compiler import TaskCompiler

    real = tmp_path / "real-cache"
    real.mkdir(mode=0o700)
    os.symlink(real, tmp_path / "link")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        TaskCompiler(str(tmp_path / "link" / "sub")).compile(_poly, "fi")
    assert not _cache_warnings(rec)
    assert any(n.endswith(".nbi") for n in _tree(str(real)))


def test_cache_directories_created_are_private_whatever_the_umask(numba, tmp_path):
    """os.makedirs(d, 0o700) gives only the last directory 0700; the parents it creates get the
    umask's mode: 0775 under umask 002 (Ubuntu's default for users with their own group), which
    the ancestors' rule then refuses, so ~/.cache/catzilla_tasks/compiled never worked there."""
    from catzilla_tasks.compiler import TaskCompiler

    d = tmp_path / "home" / ".cache" / "catzilla_tasks" / "compiled"
    old = os.umask(0o002)
    try:
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            spec = TaskCompiler(str(d)).compile(_poly, "fi")
    finally:
        os.umask(old)
    assert spec.address
    assert not _cache_warnings(rec), [str(w.message) for w in rec]
    for p in (d, d.parent, d.parent.parent, d.parent.parent.parent):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o700, p
    assert TaskCompiler(str(d)).compile(_poly, "fi").cache_hit


def test_failure_names_in_stats_carry_no_credentials(caplog):
    """A task given as functools.partial(send, url) is named by its repr in
    get_stats()["recent_failures"], bound arguments included: the error text was redacted,
    the name beside it was not (json_stats masked it when served, get_stats() did not)."""
    import functools

    from catzilla_tasks import BackgroundTasks

    def send(url, x):
        raise ValueError("boom")

    with BackgroundTasks(workers=1, min_workers=1, enable_auto_scaling=False) as t:
        r = t.add_task(functools.partial(send, "redis://:hunter2-Pw@db:6379/0"), 1)
        with pytest.raises(ValueError):
            r.wait(30)
        failures = t.monitor.get_stats()["recent_failures"]
        t.add_task(functools.partial(send, "redis://:hunter2-Pw@db:6379/0"), 2)  # handle dropped: logged
        t.join(30)
    assert failures and "hunter2" not in repr(failures), failures
    assert "partial" in failures[0]["name"] and "redis://:***@db:6379/0" in failures[0]["name"]
    logged = [rec.getMessage() for rec in caplog.records if "partial" in rec.getMessage()]
    assert logged and not [m for m in logged if "hunter2" in m], logged
