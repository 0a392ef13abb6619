# make run   - meta-train iMAML over a zero-started head on the embedded glyphs benchmark
#              (configs/glyphs-imaml-head.yaml; sets up .venv first)
# make test  - run the test suite (sets up .venv first)
# Pass flags to run.py with ARGS, e.g.  make run ARGS="--algo maml --task sinusoid --shots 10"

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.imaml-setup-done
ARGS ?=
RUN_ARGS = $(if $(ARGS),$(ARGS),--config configs/glyphs-imaml-head.yaml)
PYTEST_ARGS ?= -q

.PHONY: setup run test clean

$(STAMP): scripts/setup-env.sh requirements/base.txt requirements/constraints.txt setup.cfg
	bash scripts/setup-env.sh $(VENV)
	touch $@

setup: $(STAMP)

run: $(STAMP)
	$(PY) run.py $(RUN_ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
