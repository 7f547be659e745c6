# One entry point for a fresh machine. `make demo` and `make test` do their own set-up.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
SRC := $(wildcard src/catzilla_tasks/_engine/*.c src/catzilla_tasks/_engine/*.h)

.PHONY: venv build demo test test-quick lint bench chaos asan-test tsan-test wheel clean

# Re-installs when pyproject.toml changes (a new test dependency reaches existing venvs too).
$(VPY): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip 'setuptools>=77'
	$(VPY) -m pip install -q -e '.[test]'
	touch $(VPY)

venv: $(VPY)

# Rebuild the extension in place when a C file changed.
build: $(VPY)
	CATZILLA_TASKS_BUILD=release $(VPY) setup.py -q build_ext --inplace --force

demo: build
	$(VPY) examples/quickstart.py

test: build
	$(VPY) -m pytest -q
	$(MAKE) asan-test tsan-test

test-quick: build
	$(VPY) -m pytest -q -m 'not stress and not slow'

# The code checks alone (configured in pyproject.toml; also part of the suite: tests/test_lint.py):
# ruff lint and format check, mypy over src/, stubtest of the extension's _engine.pyi.
lint: build
	$(VPY) -m pytest -q tests/test_lint.py

bench: build
	$(VPY) -m pip install -q -e '.[bench]' >/dev/null 2>&1 || $(VPY) -m pip install -q 'catzilla==0.2.3' psutil
	$(VPY) benchmarks/run.py

# The distributed mode's fault-injection suite with a long random schedule (the normal test
# run has a 12-second one). CATZILLA_CHAOS_SEED=N replays a schedule.
CHAOS_SECONDS ?= 300
chaos: build
	CATZILLA_CHAOS_SECONDS=$(CHAOS_SECONDS) $(VPY) -m pytest -q -s tests/test_redis_chaos.py

# The Python test suite against an AddressSanitizer + UBSan build of the extension.
asan-test: $(VPY)
	scripts/sanitizer-tests asan

# The engine's own C stress test under ThreadSanitizer (no Python involved).
tsan-test:
	scripts/sanitizer-tests tsan

# An sdist and a manylinux wheel in dist/, checked with twine, then installed into a new
# virtualenv with no compiler on PATH and run (quickstart + smoke test): scripts/wheel.
wheel:
	PY=$(PY) scripts/wheel

clean:
	rm -rf build dist $(VENV) src/catzilla_tasks/*.so .pytest_cache
