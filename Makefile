# Everyday commands. `make run` is all a newcomer needs (Python 3.10+; Redis is embedded).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements.stamp

.PHONY: venv run test test-fast lint format bench demo clean

venv: $(STAMP)

# Re-install only when a requirements file changed since the last install.
$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements-dev.txt
	touch $(STAMP)

run: venv
	$(PY) -m ml_backend run

# pytest exits 5 when it collected nothing; make turns that (like any failure) into an error.
test: venv
	bash scripts/install_chromium.sh
	bash scripts/install_docker_compose.sh
	bash scripts/install_label_studio.sh
	$(PY) -m pytest -q || { status=$$?; [ $$status -ne 5 ] || echo "pytest collected no tests" >&2; exit $$status; }

test-fast: venv
	$(PY) -m pytest -q -m "not e2e and not browser"

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: venv
	$(PY) tests/benchmarks/bench_webhooks.py
	for script in tests/benchmarks/bench_*.py; do \
		[ "$$script" = tests/benchmarks/bench_webhooks.py ] || $(PY) $$script || exit 1; \
	done

demo: venv
	$(PY) -m ml_backend demo

clean:
	rm -rf .pytest_cache .ruff_cache
