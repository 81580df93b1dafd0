# Two commands for a newcomer: `make run` and `make test`. Both create or update .venv with pip first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PORT ?= 8501
# torch's OpenMP threads otherwise spin-wait, which makes small operations many times slower
# whenever anything else (a browser, another user's request) wants the CPU.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: run test test-load lint format clean-cache

$(PY):
	$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "Python 3.10 or newer is needed")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/streamlit run dashboard/streamlit_app.py --server.port $(PORT)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest

# Ten browser sessions at once against one server, twice over (about 7 minutes on 2 cores).
test-load: $(STAMP)
	$(PY) -m pytest -m load tests/load

lint: $(STAMP)
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean-cache:
	rm -rf "$${INFLUENCE_CACHE_DIR:-$$HOME/.cache/influence-explorer}"
