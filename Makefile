# Two entry points (see README "Quick start"):
#   make train        create .venv if needed, install the lock, run the phantom demo end to end
#   make test         same install, run the test suite (without the slow tests)
# Others:
#   make lock         regenerate requirements.lock from requirements.txt
#   make test-latest  the suite in a throwaway venv with the newest versions requirements.txt allows
#   make test-slow    the slow tests only: the paper preset end to end on the CPU (30-70 minutes on 2 shared cores)
#   make paper-cpu    the same run as a benchmark, its log in benchmarks/paper_cpu.log
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ARGS   ?=
LOCK   := requirements.lock
# The lock holds torch at the newest release the CI machines carry on their disk
# (a newer CUDA build is a multi-GB download); requirements.txt stays open above it.
LOCK_PINS := torch==2.14.1 torchvision==0.29.1
LOCK_TOOL := uv==0.13.9

.PHONY: install train test test-slow paper-cpu test-latest lock clean

# The stamp depends on the lock and records its hash, so a changed lock refreshes an
# old venv (environment.lock_hash compares the two at run time).
$(VENV)/.installed: $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -r $(LOCK)
	sha256sum $(LOCK) | cut -c1-64 > $@

install: $(VENV)/.installed

train: install
	$(BIN)/python run_all_training.py $(ARGS)

test: install
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

test-slow: install
	$(BIN)/python -m pytest -q -m slow $(ARGS)

paper-cpu: install
	$(BIN)/python benchmarks/paper_run.py --out-dir runs/paper_cpu --log benchmarks/paper_cpu.log $(ARGS)

# A throwaway venv, so the locked one is untouched; pip resolves requirements.txt afresh.
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install --disable-pip-version-check --upgrade -r requirements.txt
	.venv-latest/bin/python -m pip freeze > .venv-latest/versions.txt
	.venv-latest/bin/python -m pytest -q -m "not slow" $(ARGS)

lock:
	test -x .venv-lock/bin/uv || ($(PYTHON) -m venv .venv-lock && .venv-lock/bin/python -m pip install -q $(LOCK_TOOL))
	printf '%s\n' $(LOCK_PINS) > .venv-lock/pins.txt
	{ echo "# The lock: exact versions of every package, transitive ones included, for Python 3.11+"; \
	  echo "# on any platform (uv pip compile --universal). Regenerate with 'make lock'; never edit by hand."; \
	  echo "# requirements.txt holds the loose ranges for installing into an environment of your own."; \
	  .venv-lock/bin/uv pip compile requirements.txt --universal --python-version 3.11 \
	    -c .venv-lock/pins.txt --no-header --annotation-style line -q; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)

clean:
	rm -rf runs .pytest_cache .venv-latest .venv-lock
