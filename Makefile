# `make demo` and `make test` create .venv/ on first use and install the package with its test extra:
# torch with pip, everything else with uv (stop 21: 88 s for the whole install on a clean clone against 156 s
# with pip alone, same package versions; on this 2-core machine with empty download caches). Nothing is
# byte-compiled at install time (pip --no-compile, uv without --compile-bytecode): 26 s for the install
# against 73 s byte-compiling all ~19,000 files (torch and transformers are 5,000 of them), same hour, same
# empty caches. Instead the suite and the demo let Python write the .pyc of what they import as they first
# import it: this environment sets PYTHONDONTWRITEBYTECODE=1, and without .pyc files every process of the
# suite would compile its imports from source again (~2.3 CPU s each for jax, flax and transformers). An
# empty value turns it off for the commands below.
export PYTHONDONTWRITEBYTECODE =
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export XLA_FLAGS ?= --xla_force_host_platform_device_count=2

.PHONY: demo test test-latest gpu-check venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, pinned and with pip: 2.13.0 is a CPU wheel on this machine's disk that only pip's
	# configuration finds (uv does not look there); an unpinned torch pulls a multi-GB CUDA build. uv then
	# keeps the installed torch, which satisfies the test extra's torch==2.13.0.
	$(PY) -m pip install -q --no-compile torch==2.13.0 uv
	$(VENV)/bin/uv pip install -q --python $(PY) -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m twotower_jax.demo

# The suite: one pytest run on 2 pytest-xdist workers, a whole file per worker at a time (--dist loadfile:
# module fixtures are built once). Files are handed out in collection order, which tests/conftest.py sets
# to the slowest files first (--no-loadscope-reorder keeps it; xdist would otherwise order by test count),
# so the run ends on short files instead of one worker finishing a long one alone.
# The two host-memory tests (tracemalloc peaks) run each in a process that has run nothing else (after other
# tests in the same process the converter's measured peak rose from 2.9x to 5.0x the largest tensor): on 2
# more workers in the background, their output printed after the main run's. XDIST= runs the main part in
# one process: a process that kept every compiled program ran out of memory mappings inside an XLA:CPU
# compile; conftest now releases them after each file (the whole suite has not been re-run in one process).
# All the processes of a run (and the subprocesses the tests start) share one persistent compilation cache
# (tests/conftest.py), a new directory for each run, removed at its end: a program compiled twice in a run
# is loaded the second time. The suite's stated time is that of this cold start.
XDIST ?= -n 2 --dist loadfile --no-loadscope-reorder
# SUITE(python, extra pytest flags): the memory tests in the background, the main run, then the memory
# tests' output; one EXIT trap stops the memory tests if the main run fails first and removes the cache and log.
SUITE = set -e; cache=$$(mktemp -d "$${TMPDIR:-/tmp}/twotower-test-jax-cache-XXXXXX"); memlog=$$(mktemp); memory=; \
	trap 'test -z "$$memory" || kill $$memory 2>/dev/null; rm -rf "$$cache" "$$memlog"' EXIT; \
	export JAX_COMPILATION_CACHE_DIR=$$cache; \
	$(1) -m pytest -q $(2) --durations=8 -n 2 --dist loadfile $(MEMORY_TESTS) > $$memlog 2>&1 & memory=$$!; \
	$(1) -m pytest -q $(2) --durations=15 $(XDIST) tests $(foreach t,$(MEMORY_TESTS),--ignore=$(t)); \
	status=0; wait $$memory || status=$$?; memory=; echo "== $(MEMORY_TESTS) (run beside the main run)"; \
	cat $$memlog; exit $$status
MEMORY_TESTS := tests/test_convert.py tests/test_load_to_devices.py

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

# On a machine with a GPU and jax[cuda] installed (under 9 minutes on an H100; no network needed):
# writes experiments/results/gpu_check_<device>.{json,md}, then times one decode step of the 22.7M config at
# batch 1 and 8 (issue 12's batch-8 ≤ 2x batch-1 target; ~30 s) into decode_batch_step_gpu.json.
# GPU_PY: that machine's python.
GPU_PY ?= python3

gpu-check:
	PYTHONPATH=. $(GPU_PY) experiments/gpu_check.py
	cd experiments && PYTHONPATH=.. $(GPU_PY) bench_decode_batch.py --parts step --variants old,new --rounds 10 \
		--steps 5 --out results/decode_batch_step_gpu.json

clean:
	rm -rf $(VENV) .pytest_cache
