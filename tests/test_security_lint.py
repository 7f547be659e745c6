"""The security lint (issue 14): ruff's flake8-bandit rules (S) over src/ find nothing that is
not justified inline (`# noqa: S301 - reason`). Part of the test suite, so CI runs it."""

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "src")


def _ruff():
    exe = shutil.which("ruff", path=os.path.dirname(sys.executable)) or shutil.which("ruff")
    if exe:
        return [exe]
    try:
        import ruff  # noqa: F401
    except ImportError:
        pytest.fail("ruff is not installed: pip install -e '.[test]' (the test extra has it)")
    return [sys.executable, "-m", "ruff"]


def test_ruff_security_rules_pass_over_src():
    p = subprocess.run([*_ruff(), "check", "--select", "S", "--no-cache", "--output-format", "concise", SRC],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr


def test_every_security_exception_says_why():
    bare = []
    for folder, _, files in os.walk(SRC):
        for fn in files:
            if fn.endswith(".py"):
                path = os.path.join(folder, fn)
                with open(path, encoding="utf-8") as f:
                    for n, line in enumerate(f, 1):
                        m = re.search(r"#\s*noqa:([^#]*)", line)
                        said_why = m and re.search(r"\bS\d{3}\b[^-]*-\s*\S", m.group(1))
                        if m and re.search(r"\bS\d{3}\b", m.group(1)) and not said_why:
                            bare.append(f"{os.path.relpath(path, ROOT)}:{n}: {line.strip()}")
    assert not bare, "a `# noqa: S...` without its reason (`# noqa: S301 - why`):\n" + "\n".join(bare)
