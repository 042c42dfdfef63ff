# `make demo` and `make test` create .venv/ on first use and install the package with its test extra.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export XLA_FLAGS ?= --xla_force_host_platform_device_count=2

.PHONY: demo test test-latest gpu-check venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: 2.13.0 is a CPU wheel; an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m twotower_jax.demo

# The suite runs as several pytest processes, each file in exactly one: in one process for the whole suite,
# XLA:CPU crashed (segfault / abort inside a compile in test_two_tower.py, seen three times this stop on jax
# 0.10.2 and 0.12, never with the file run alone). Root cause not found yet; see the README. The two
# host-memory tests (tracemalloc peaks) run each in a process that has run nothing else: after other tests
# in the same process the converter's measured peak rose from 2.9x to 5.0x the largest tensor.
# Each group runs on 2 pytest-xdist workers, a whole file per worker (--dist loadfile: module fixtures are
# built once, and no file shares a process with more files than before). XDIST= runs each of those groups
# in one process. The two memory-test files run together on 2 workers whatever XDIST is: one file each,
# in the background beside the first group (their measure is each process's own Python heap, which other
# processes do not touch; the groups leave a core idle at their ends, which this fills); their output is
# printed after the groups'.
# All the processes of a run (and the subprocesses the tests start) share one persistent compilation cache
# (tests/conftest.py), a new directory for each run, removed at its end: a program compiled twice in a run
# is loaded the second time. The suite's stated time is that of this cold start.
XDIST ?= -n 2 --dist loadfile
# SUITE(python, extra pytest flags): the memory tests in the background, the groups in turn, then the memory
# tests' output; one EXIT trap stops the memory tests if a group fails first and removes the cache and log.
SUITE = set -e; cache=$$(mktemp -d "$${TMPDIR:-/tmp}/twotower-test-jax-cache-XXXXXX"); memlog=$$(mktemp); memory=; \
	trap 'test -z "$$memory" || kill $$memory 2>/dev/null; rm -rf "$$cache" "$$memlog"' EXIT; \
	export JAX_COMPILATION_CACHE_DIR=$$cache; \
	$(1) -m pytest -q $(2) --durations=8 -n 2 --dist loadfile $(MEMORY_TESTS) > $$memlog 2>&1 & memory=$$!; \
	for group in $(TEST_GROUPS); do $(1) -m pytest -q $(2) --durations=8 $(XDIST) $$group; done; \
	status=0; wait $$memory || status=$$?; memory=; echo "== $(MEMORY_TESTS) (run beside the first group)"; \
	cat $$memlog; exit $$status
MEMORY_TESTS := tests/test_convert.py tests/test_load_to_devices.py
TEST_GROUPS := 'tests/test_[ab]*.py tests/test_c[a-n]*.py tests/test_conf*.py tests/test_[d-g]*.py' \
	'tests/test_[h-k]*.py tests/test_la*.py tests/test_[m-o]*.py' \
	'tests/test_[p-s]*.py' 'tests/test_[t-z]*.py'

test: $(STAMP)
	$(call SUITE,$(PY))

# The suite on the newest jax/flax/orbax from PyPI (they need Python >= 3.12), in .venv-latest/. torch and
# transformers are left out: the tests that use them as the oracle skip, and -rs prints why.
LATEST_VENV ?= .venv-latest
# The first python3.12 that runs (a pyenv shim can exist and still fail when 3.12 is not its global version).
PY312 ?= $(shell for p in python3.12 /root/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do \
	$$p -c '' 2>/dev/null && { command -v $$p; break; }; done)

test-latest:
	test -x $(LATEST_VENV)/bin/python || $(PY312) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade jax flax orbax-checkpoint
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade -e '.[test-base]'
	$(LATEST_VENV)/bin/python -c "import sys, jax, flax; print('python', sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__)"
	$(call SUITE,$(LATEST_VENV)/bin/python,-rs)

# On a machine with a GPU and jax[cuda] installed (under 8 minutes on an H100; no network needed):
# writes experiments/results/gpu_check_<device>.{json,md}. GPU_PY: that machine's python.
GPU_PY ?= python3

gpu-check:
	PYTHONPATH=. $(GPU_PY) experiments/gpu_check.py

clean:
	rm -rf $(VENV) .pytest_cache
