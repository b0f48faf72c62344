# Two commands do all set-up: `make demo` and `make test` (each creates .venv on first use).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint install bench image-test clean

$(STAMP): pyproject.toml requirements/lock.txt scripts/install.sh
	VENV=$(VENV) bash scripts/install.sh
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m search demo

lint: $(STAMP)
	$(VENV)/bin/ruff check search trainers spaces mmconfigs cocodata results tracking_names tests bench docker
	$(VENV)/bin/mypy

test: lint
	@start=$$(date +%s); \
	$(PY) -m pytest -q; status=$$?; \
	echo "test suite: $$(( $$(date +%s) - start )) s"; exit $$status

# The inner loop: everything but the tests marked slow (long training runs); CI runs `make test`, all of them.
test-fast: lint
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) bench/overhead.py

# The cluster images built and run for real with podman (docker/smoke.sh; CI does not run it). Options go in
# SMOKE_ARGS, e.g. SMOKE_ARGS="--local-bases --runc" on a machine without a container registry.
image-test:
	bash docker/smoke.sh $(SMOKE_ARGS)

clean:
	rm -rf runs data/synth .pytest_cache .mypy_cache
