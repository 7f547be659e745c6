"""Every code snippet of README.md and docs/*.md runs, so none can rot.

Each ```python block is one program, run as a script (``python block.py``) in a fresh
subprocess with a hard timeout, in a scratch directory of its document (so ``__main__``
guards, relative files and imports of sibling modules behave as for a user). The repository's
``src/`` and that directory are on ``PYTHONPATH``; compiled tasks cache in a scratch directory.

Conventions, written as an HTML comment on the line(s) right before a block's fence (invisible
on GitHub). A block with none of them must run as it is:

``<!-- doctest: continues -->``
    The block continues the previous ```python block of the same document: the two (or more)
    run as one program (for a snippet that needs the names a previous one defined).
``<!-- doctest: file NAME.py -->``
    The block is a module, written as NAME.py into the document's directory before any block
    of that document runs; it is not run by itself (later blocks import it).
``<!-- doctest: worker MODULE:ATTR -->``
    A distributed worker (``catzilla-tasks worker MODULE:ATTR``) runs in the document's
    directory while the block runs, and is stopped with SIGTERM after it.
``<!-- doctest: skip REASON -->``
    Not run. The reason is required; use it only for what cannot run here (none today).

Every ``redis://``, ``rediss://`` URL in a block is replaced with the URL of a real
redis-server the test starts (tests/redis_helpers.py) when some block of the document needs one.

Shell blocks (```bash, ```sh) are not run, but the commands they name are checked: ``make X``
needs a target X in the Makefile, ``catzilla-tasks ...`` must parse with the CLI's own parser,
``.venv/bin/python PATH`` needs PATH in the repository.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_TIMEOUT_S = 90  # per program; the slowest (numba's first compile) takes a few seconds

_FENCE = re.compile(r"^(`{3,})\s*([\w+-]*)\s*$")
_DIRECTIVE = re.compile(r"^<!--\s*doctest:\s*(.*?)\s*-->\s*$")
_URL = re.compile(r"\brediss?://[^\s\"'`)]*")


@dataclass
class Block:
    doc: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    directives: list[str]


@dataclass
class Program:
    doc: Path
    line: int
    code: str
    worker: str | None = None
    lines: list[int] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def parse_blocks(doc: Path) -> list[Block]:
    blocks: list[Block] = []
    lines = doc.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m.group(1), m.group(2).lower()
        directives = []
        j = i - 1
        while j >= 0 and _DIRECTIVE.match(lines[j]):
            directives.insert(0, _DIRECTIVE.match(lines[j]).group(1))
            j -= 1
        body = []
        k = i + 1
        while k < len(lines) and lines[k].strip() != fence:
            body.append(lines[k])
            k += 1
        if k == len(lines):
            raise ValueError(f"{doc.name}:{i + 1}: code block never closed")
        blocks.append(Block(doc, i + 1, lang, "\n".join(body) + "\n", directives))
        i = k + 1
    return blocks


def programs_and_files(doc: Path) -> tuple[list[Program], dict[str, str]]:
    """The document's programs (continued blocks joined) and its module files."""
    programs: list[Program] = []
    files: dict[str, str] = {}
    for b in parse_blocks(doc):
        if b.lang != "python":
            continue
        where = f"{doc.name}:{b.line}"
        kinds = [d.split(None, 1) for d in b.directives]
        if any(not k for k in kinds):
            raise ValueError(f"{where}: empty doctest directive")
        names = [k[0] for k in kinds]
        unknown = set(names) - {"continues", "file", "worker", "skip"}
        if unknown:
            raise ValueError(f"{where}: unknown doctest directive(s) {sorted(unknown)}")
        args = {k[0]: (k[1] if len(k) > 1 else "") for k in kinds}
        if "skip" in args:
            if not args["skip"]:
                raise ValueError(f"{where}: `doctest: skip` needs a reason")
            continue
        if "file" in args:
            name = args["file"]
            if not re.fullmatch(r"\w+\.py", name):
                raise ValueError(f"{where}: `doctest: file` needs a module file name, got {name!r}")
            files[name] = b.code
            continue
        if "continues" in args:
            if not programs:
                raise ValueError(f"{where}: `doctest: continues` with no block before it")
            prev = programs[-1]
            prev.code += "\n" + b.code
            prev.lines.append(b.line)
            prev.worker = prev.worker or args.get("worker") or None
            continue
        programs.append(Program(doc, b.line, b.code, args.get("worker") or None, [b.line]))
    return programs, files


def _all_programs() -> list[Program]:
    out = []
    for doc in DOCS:
        out.extend(programs_and_files(doc)[0])
    return out


PROGRAMS = _all_programs()


def _needs_redis(text: str) -> bool:
    return bool(_URL.search(text))


@pytest.fixture(scope="module")
def redis_server_url():
    """A real redis-server, started on first use by a block that names a Redis URL."""
    servers = []

    def get() -> str:
        if not servers:
            from redis_helpers import RedisServer

            servers.append(RedisServer())
        return servers[0].url

    yield get
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def doc_dirs(tmp_path_factory):
    """One scratch directory per document, with its module files written."""
    made: dict[Path, Path] = {}

    def get(doc: Path, url_for) -> Path:
        if doc not in made:
            d = tmp_path_factory.mktemp(doc.stem.lower())
            for name, code in programs_and_files(doc)[1].items():
                if _needs_redis(code):
                    code = _URL.sub(url_for(), code)
                (d / name).write_text(code, encoding="utf-8")
            made[doc] = d
        return made[doc]

    return get


def _env(workdir: Path, cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(workdir)])
    env["CATZILLA_TASKS_CACHE_DIR"] = str(cache)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.mark.timeout(RUN_TIMEOUT_S * 2 + 60)
@pytest.mark.parametrize("program", PROGRAMS, ids=[p.id for p in PROGRAMS])
def test_python_block_runs(program: Program, doc_dirs, redis_server_url, tmp_path_factory):
    workdir = doc_dirs(program.doc, redis_server_url)  # module files: their URLs substituted
    code = _URL.sub(redis_server_url(), program.code) if _needs_redis(program.code) else program.code
    script = workdir / f"block_{program.line}.py"
    script.write_text(code, encoding="utf-8")
    cache = workdir / "compiled-cache"
    cache.mkdir(mode=0o700, exist_ok=True)
    env = _env(workdir, cache)
    worker = None
    if program.worker:
        worker = subprocess.Popen(
            [sys.executable, "-m", "catzilla_tasks.cli", "worker", program.worker, "--concurrency", "16"],
            cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
    try:
        proc = subprocess.run([sys.executable, script.name], cwd=workdir, env=env, capture_output=True,
                              text=True, timeout=RUN_TIMEOUT_S, check=False)
    finally:
        worker_out = ""
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker_out = worker.communicate(timeout=30)[0]
            except subprocess.TimeoutExpired:
                worker.kill()
                worker_out = worker.communicate()[0]
    assert proc.returncode == 0, (
        f"{program.id} (blocks at lines {program.lines}) failed with status {proc.returncode}\n"
        f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        + (f"\n--- worker\n{worker_out}" if worker is not None else "")
    )
    # a failure only logged (a raising callback, a task nobody waited for) fails the snippet too
    assert "Traceback (most recent call last)" not in proc.stderr, (
        f"{program.id}: the program logged an exception\n--- stderr\n{proc.stderr}"
    )
    if worker is not None:
        assert "Traceback (most recent call last)" not in worker_out, (
            f"the worker for {program.id} logged an exception:\n{worker_out}"
        )
        assert worker.returncode == 0, f"the worker for {program.id} exited with {worker.returncode}:\n{worker_out}"


# -- shell blocks: not run, but what they name must exist -------------------------------------

def _shell_commands() -> list[tuple[str, str]]:
    out = []
    for doc in DOCS:
        for b in parse_blocks(doc):
            if b.lang not in ("bash", "sh", "shell", "console"):
                continue
            for n, raw in enumerate(b.code.splitlines()):
                cmd = raw.split(" #", 1)[0].strip()
                if cmd and not cmd.startswith("#"):
                    out.append((f"{doc.relative_to(ROOT)}:{b.line + 1 + n}", cmd))
    return out


SHELL = _shell_commands()


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return {m.group(1) for m in re.finditer(r"^([A-Za-z][\w-]*)\s*:(?!=)", text, re.MULTILINE)}


@pytest.mark.parametrize("where,cmd", SHELL, ids=[w for w, _ in SHELL])
def test_shell_block_names_what_exists(where: str, cmd: str):
    words = shlex.split(cmd)
    if words[0] == "make":
        missing = [t for t in words[1:] if not t.startswith("-") and t not in _make_targets()]
        assert not missing, f"{where}: `{cmd}` names make target(s) {missing} the Makefile does not have"
    elif words[0] == "catzilla-tasks":
        from catzilla_tasks.cli import build_parser

        try:
            build_parser().parse_args(words[1:])
        except SystemExit as exc:
            pytest.fail(f"{where}: `{cmd}` does not parse with the CLI's parser (exit {exc.code})")
    elif words[0].endswith("/python") or words[0] == "python":
        scripts = [w for w in words[1:] if w.endswith(".py")]
        missing = [s for s in scripts if not (ROOT / s).is_file()]
        assert not missing, f"{where}: `{cmd}` names {missing}, not in the repository"


_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("doc", [*DOCS, ROOT / "benchmarks" / "README.md", ROOT / "benchmarks" / "RESULTS.md"],
                         ids=lambda d: str(d.relative_to(ROOT)))
def test_relative_links_exist(doc: Path):
    """A link to a file of the repository names one that exists (and nothing outside it)."""
    bad = []
    for target in _LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue  # http(s)://, mailto:
        path = (doc.parent / target).resolve()
        if not path.exists() or ROOT not in path.parents:
            bad.append(target)
    assert not bad, f"{doc.relative_to(ROOT)} links to {bad}, not files of the repository"


def test_conventions_are_checked():
    """The parser refuses what the conventions do not allow (so a typo cannot skip a block)."""
    import tempfile

    cases = {
        "<!-- doctest: skip -->\n```python\nx = 1\n```\n": "needs a reason",
        "<!-- doctest: skipp x -->\n```python\nx = 1\n```\n": "unknown doctest directive",
        "<!-- doctest: continues -->\n```python\nx = 1\n```\n": "no block before it",
        "<!-- doctest: file a/b.py -->\n```python\nx = 1\n```\n": "module file name",
    }
    for text, message in cases.items():
        with tempfile.NamedTemporaryFile("w", suffix=".md", delete=False) as f:
            f.write(text)
        try:
            with pytest.raises(ValueError, match=message):
                programs_and_files(Path(f.name))
        finally:
            os.unlink(f.name)
    with tempfile.NamedTemporaryFile("w", suffix=".md", delete=False) as f:
        f.write("```python\na = 1\n```\n<!-- doctest: continues -->\n```python\nassert a == 1\n```\n"
                "<!-- doctest: file m.py -->\n```python\nb = 2\n```\n")
    try:
        progs, files = programs_and_files(Path(f.name))
    finally:
        os.unlink(f.name)
    assert [p.lines for p in progs] == [[1, 5]] and files == {"m.py": "b = 2\n"}
