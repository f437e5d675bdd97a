PYTHON ?= python3
PYTEST_ARGS ?=

.PHONY: deps test test-fast demo clean

deps:
	sh tools/install-deps.sh

# The README's test command: installs what it needs, then runs every test on the real kernel.
test: deps
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

test-fast: deps
	$(PYTHON) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The README's main job.
demo: deps
	$(PYTHON) -m bpfilter_umh.demo

clean:
	rm -rf .pytest_cache .hypothesis build *.egg-info
	find . -name __pycache__ -type d -exec rm -rf {} +
