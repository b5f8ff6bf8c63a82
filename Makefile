# Two entry points (see README "Quick start"):
#   make train   create .venv if needed, install, run the phantom demo end to end
#   make test    same install, run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ARGS   ?=

.PHONY: install train test clean

# The stamp is rebuilt whenever requirements.txt changes, so a stale venv is refreshed.
$(VENV)/.installed: requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -r requirements.txt
	touch $@

install: $(VENV)/.installed

train: install
	$(BIN)/python run_all_training.py $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(ARGS)

clean:
	rm -rf runs .pytest_cache
