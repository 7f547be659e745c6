"""Secrets never shown: every URL in a repr, a log line or an error is redacted (issue 14, item 4)."""

import pytest

from catzilla_tasks._redact import redact_text, redact_url
from catzilla_tasks.cli import StatsError, _redact

SECRET = "s3cr3t-Pw"

# (url, what redact_url shows): every form a broker or stats URL is written in
CASES = [
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("redis://:s3cr3t-Pw@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    ("redis://alice:s3cr3t-Pw@redis.internal:6379/2", "redis://alice:***@redis.internal:6379/2"),
    ("rediss://default:s3cr3t-Pw@cache.example.com:6380/0?ssl_cert_reqs=required",
     "rediss://default:***@cache.example.com:6380/0?ssl_cert_reqs=required"),
    # a user name alone: some services take it as the token
    ("redis://s3cr3t-Pw@host:6379", "redis://***@host:6379"),
    # a raw '@' or ':' inside the password
    ("redis://u:s3cr3t-Pw@x:y@host/0", "redis://u:***@host/0"),
    ("redis://:s3cr3t%40-Pw@host/0", "redis://:***@host/0"),
    # the unix socket form carries its password as a query parameter
    ("unix:///var/run/redis.sock?db=0&password=s3cr3t-Pw", "unix:///var/run/redis.sock?db=0&password=***"),
    ("unix:///tmp/r.sock?password=s3cr3t-Pw&db=3", "unix:///tmp/r.sock?password=***&db=3"),
    ("redis://host/0?PassWord=s3cr3t-Pw", "redis://host/0?PassWord=***"),
    ("redis://host/0?pass%77ord=s3cr3t-Pw", "redis://host/0?pass%77ord=***"),
    # IPv6 hosts keep their brackets
    ("redis://[::1]:6379/0", "redis://[::1]:6379/0"),
    ("redis://:s3cr3t-Pw@[::1]:6379/0", "redis://:***@[::1]:6379/0"),
    ("redis://bob:s3cr3t-Pw@[2001:db8::7]:6380/1?password=s3cr3t-Pw",
     "redis://bob:***@[2001:db8::7]:6380/1?password=***"),
    # tokens of HTTP stats URLs
    ("http://127.0.0.1:8765/stats.json?token=s3cr3t-Pw", "http://127.0.0.1:8765/stats.json?token=***"),
    ("https://h.example/s?a=1&access_token=s3cr3t-Pw&b=2", "https://h.example/s?a=1&access_token=***&b=2"),
    ("https://h.example/s?api_key=s3cr3t-Pw;apikey=s3cr3t-Pw", "https://h.example/s?api_key=***;apikey=***"),
    ("https://h.example/s?client_secret=s3cr3t-Pw&auth=s3cr3t-Pw", "https://h.example/s?client_secret=***&auth=***"),
    ("https://h.example/cb#access_token=s3cr3t-Pw&state=1", "https://h.example/cb#access_token=***&state=1"),
    ("https://h.example/page#section-2", "https://h.example/page#section-2"),
    ("https://h.example/s?q=password", "https://h.example/s?q=password"),
    # not URLs a parser accepts: still nothing shown
    ("redis://:s3cr3t-Pw@[::1:6379/0", "redis://:***@[::1:6379/0"),
    ("redis://:s3cr3t-Pw@host:notaport/0", "redis://:***@host:notaport/0"),
    ("ftp://u:s3cr3t-Pw@host/", "ftp://u:***@host/"),
    ("", ""),
]


@pytest.mark.parametrize("url,shown", CASES)
def test_redact_url_table(url, shown):
    assert redact_url(url) == shown
    assert _redact(url) == shown   # the CLI's messages use the same rules
    assert SECRET not in redact_url(url) and "s3cr3t%40-Pw" not in redact_url(url)
    assert redact_url(redact_url(url)) == shown   # idempotent


def test_redact_text_finds_urls_and_pairs():
    msg = ("ConnectionError: cannot reach redis://:s3cr3t-Pw@db:6379/0 (also tried "
           "unix:///tmp/r.sock?password=s3cr3t-Pw) with dsn host=db password=s3cr3t-Pw user=x")
    out = redact_text(msg)
    assert SECRET not in out
    assert "redis://:***@db:6379/0" in out and "unix:///tmp/r.sock?password=***" in out
    assert "password=*** user=x" in out
    assert redact_text("no secret here: 1 + 1 = 2") == "no secret here: 1 + 1 = 2"


def test_broker_repr_and_bad_scheme_error_are_redacted():
    pytest.importorskip("redis")
    from catzilla_tasks.brokers.redis import RedisBroker

    for url in ("unix:///tmp/nowhere.sock?db=0&password=s3cr3t-Pw", "redis://:s3cr3t-Pw@[::1]:6399/0"):
        b = RedisBroker(url)   # no connection is made until it is used
        try:
            r = repr(b)
            assert SECRET not in r and "***" in r
        finally:
            b.close()
    with pytest.raises(ValueError) as ei:
        RedisBroker("http://:s3cr3t-Pw@host/0?password=s3cr3t-Pw")
    assert SECRET not in str(ei.value) and "http://:***@host/0?password=***" in str(ei.value)


def test_worker_start_line_is_redacted(tmp_path, monkeypatch):
    """`catzilla-tasks worker` prints the broker URL it serves: without the password."""
    pytest.importorskip("redis")
    import io

    from catzilla_tasks.brokers import commands

    class FakeWorker:
        consumer, concurrency = "w1", 1

        def __init__(self, tasks, broker=None, concurrency=1, heartbeat_interval=None):
            pass

        def run(self, install_signals):
            pass

        def stats(self):
            return {"succeeded": 0, "failed": 0, "retried": 0, "dead_lettered": 0}

    (tmp_path / "redact_app.py").write_text(
        "from catzilla_tasks import BackgroundTasks\n"
        "tasks = BackgroundTasks(workers=1, min_workers=1, broker='unix:///tmp/none.sock?password=s3cr3t-Pw')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("catzilla_tasks.brokers.worker.Worker", FakeWorker)
    out = io.StringIO()
    from catzilla_tasks.cli import build_parser

    args = build_parser().parse_args(["worker", "redact_app:tasks"])
    assert commands.cmd_worker(args, out) == 0
    assert SECRET not in out.getvalue() and "password=***" in out.getvalue()


def test_stats_error_messages_are_redacted():
    from catzilla_tasks.cli import RemoteStats

    r = RemoteStats("http://u:s3cr3t-Pw@127.0.0.1:9/stats.json?token=s3cr3t-Pw", timeout=2)
    with pytest.raises(StatsError) as ei:
        r()
    assert SECRET not in str(ei.value)
