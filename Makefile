# make run   - meta-train iMAML on the embedded glyphs benchmark (sets up .venv first)
# make test  - run the test suite (sets up .venv first)
# Pass flags to run.py with ARGS, e.g.  make run ARGS="--algo maml --task sinusoid --shots 10"

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.imaml-setup-done
ARGS ?=
PYTEST_ARGS ?= -q

.PHONY: setup run test clean

$(STAMP): scripts/setup-env.sh requirements/base.txt requirements/constraints.txt setup.cfg
	bash scripts/setup-env.sh $(VENV)
	touch $@

setup: $(STAMP)

run: $(STAMP)
	$(PY) run.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
