"""The CLI's trust boundaries (issue 14): redirects never carry the token elsewhere (item 2);
`catzilla-tasks worker module:tasks` does not put the current directory first on sys.path (item 5)."""

import http.server
import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest

from catzilla_tasks import cli
from catzilla_tasks.dashboard import json_safe

STATS = {"queue_metrics": {"total_queued": 0}, "totals": {"submitted": 7}}


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Answers with stats, or redirects when the server has a `redirect_to`; records headers."""

    def do_GET(self):
        self.server.seen.append((self.path.partition("?")[0], self.headers.get("Authorization")))
        target = self.server.redirect_to.get(self.path.partition("?")[0])
        if target:
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = json.dumps(json_safe(STATS)).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture
def http_server():
    made = []

    def make(redirect_to=None):
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
        httpd.seen, httpd.redirect_to = [], dict(redirect_to or {})
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        made.append(httpd)
        return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"

    yield make
    for h in made:
        h.shutdown()
        h.server_close()


def test_token_is_not_sent_to_another_origin(http_server):
    other, other_url = http_server()
    first, first_url = http_server({"/stats.json": other_url + "/stats.json"})
    with pytest.raises(cli.StatsError, match="another origin") as ei:
        cli.RemoteStats(first_url + "/", token="tok-secret")()
    assert "tok-secret" not in str(ei.value)
    assert other.seen == []                       # nothing reached the other server
    assert first.seen == [("/stats.json", "Bearer tok-secret")]
    # a token in the URL is a credential too
    with pytest.raises(cli.StatsError, match="another origin"):
        cli.RemoteStats(first_url + "/stats.json?token=tok-secret")()
    assert other.seen == []
    # without credentials the redirect is followed
    assert cli.RemoteStats(first_url + "/")()["totals"]["submitted"] == 7
    assert other.seen == [("/stats.json", None)]


def test_same_origin_redirect_keeps_the_token(http_server):
    srv, url = http_server({"/old/stats.json": "/stats.json"})
    assert cli.RemoteStats(url + "/old/", token="tok-secret")()["totals"]["submitted"] == 7
    assert srv.seen == [("/old/stats.json", "Bearer tok-secret"), ("/stats.json", "Bearer tok-secret")]


@pytest.mark.parametrize("old,new,credentials,allowed", [
    ("https://a.example/s", "http://a.example/s", False, False),       # never https -> http
    ("https://a.example/s", "http://a.example/s", True, False),
    ("https://a.example/s", "https://a.example:443/t", True, True),     # same origin, default port
    ("https://a.example/s", "https://b.example/s", True, False),
    ("https://a.example/s", "https://b.example/s", False, True),
    ("http://a.example/s", "https://a.example/s", True, False),         # another scheme: another origin
    ("http://a.example/s", "https://a.example/s", False, True),
    ("http://a.example:8765/s", "http://a.example:8766/s", True, False),
    ("http://A.example/s", "http://a.EXAMPLE:80/t", True, True),
    ("http://a.example/s", "ftp://a.example/s", False, False),
])
def test_redirect_policy(old, new, credentials, allowed):
    assert (cli.redirect_allowed(old, new, credentials) is None) is allowed


# ---- item 5: the worker's import path ---------------------------------------------------

def test_worker_app_import_does_not_shadow_installed_modules(tmp_path):
    """A module in the directory the worker starts from cannot replace a stdlib or installed
    module imported later (today cwd goes first on sys.path)."""
    (tmp_path / "myjobs.py").write_text("from catzilla_tasks import BackgroundTasks\ntasks = 'the app'\n")
    (tmp_path / "colorsys.py").write_text("raise SystemExit('planted colorsys.py was imported')\n")
    script = textwrap.dedent(f"""
        import os, sys
        os.chdir({str(tmp_path)!r})
        from catzilla_tasks.brokers.commands import load_app
        assert load_app("myjobs:tasks") == "the app"
        import colorsys
        assert colorsys.__file__ != os.path.join({str(tmp_path)!r}, "colorsys.py"), colorsys.__file__
        where = sys.path.index({str(tmp_path)!r}) if {str(tmp_path)!r} in sys.path else None
        stdlib = sys.path.index(os.path.dirname(os.__file__))
        print("ok", where, stdlib)
    """)
    env = dict(os.environ)
    # -P: the interpreter itself puts nothing unsafe on the path, as the console script does not
    p = subprocess.run([sys.executable, "-P", "-c", script], capture_output=True, text=True, timeout=120, env=env,
                       cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr + p.stdout
    _, where, stdlib = p.stdout.split()
    assert where == "None" or int(where) > int(stdlib)


def test_worker_app_found_in_an_installed_package_leaves_the_path_alone(tmp_path):
    script = textwrap.dedent(f"""
        import os, sys
        os.chdir({str(tmp_path)!r})
        before = list(sys.path)
        from catzilla_tasks.brokers.commands import load_app
        load_app("catzilla_tasks.cli:main")
        assert sys.path == before, (before, sys.path)
        print("ok")
    """)
    env = dict(os.environ)
    p = subprocess.run([sys.executable, "-P", "-c", script], capture_output=True, text=True, timeout=120, env=env,
                       cwd=str(tmp_path))
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr + p.stdout
