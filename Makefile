# make run   - meta-train iMAML over a zero-started head on the embedded glyphs benchmark
#              (configs/glyphs-imaml-head.yaml; sets up .venv first)
# make test  - run the test suite, one worker per core (sets up .venv first)
# Pass flags to run.py with ARGS: make run ARGS="--meta-steps 100" keeps make run's method (and so
# its preset); ARGS naming a method or preset runs that instead, e.g.
#   make run ARGS="--algo maml --task sinusoid --shots 10"

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.imaml-setup-done
ARGS ?=
# flags that choose the method or the preset; without them, make run's method is prepended
METHOD_FLAGS := --algo --adapt --head-init --inner-optimizer --config --lower-problem --resume --eval-only
NAMES_METHOD = $(filter $(METHOD_FLAGS) $(addsuffix =%,$(METHOD_FLAGS)),$(ARGS))
RUN_ARGS = $(if $(NAMES_METHOD),,--algo imaml --adapt head --head-init zero) $(ARGS)
PYTEST_ARGS ?= -q

.PHONY: setup run test clean

$(STAMP): scripts/setup-env.sh requirements/base.txt requirements/constraints.txt setup.cfg
	bash scripts/setup-env.sh $(VENV)
	touch $@

setup: $(STAMP)

run: $(STAMP)
	$(PY) run.py $(RUN_ARGS)

# one worker per core; a long test does not hold up the others (worksteal); one torch thread in
# every process the tests start (run.py, benchmarks), as in the workers: two workers already fill
# two cores, and more threads would only contend for them
test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -n auto --dist worksteal $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
