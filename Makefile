# Set-up and the two everyday commands. `make demo` and `make test` each create .venv and
# install the project on first use; later runs reuse it.
# GPU users: make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3.11
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DATA ?= data/demo
DEMO_RUNS ?= runs
DEMO_EPOCHS ?= 25

.PHONY: install demo test lint clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# The service's demo: submit every demo category to the queue (a private Redis is started when
# VTADL_REDIS_URL is not set), drain it with a burst worker, print the results table.
demo: install
	$(VENV)/bin/vtadl data demo $(DEMO_DATA)
	$(VENV)/bin/vtadl submit --dataset mvtec --root $(DEMO_DATA) --all-categories \
		--variant vtadl_small --epochs $(DEMO_EPOCHS) --out $(DEMO_RUNS)
	$(VENV)/bin/vtadl worker --burst
	$(VENV)/bin/vtadl results
	@echo "run folders: $(DEMO_RUNS)/mvtec/<category>/<run>/ (metrics.json, maps/*.png, tensorboard/)"

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check vtadl tests benchmarks

clean:
	rm -rf $(VENV) runs data/demo .pytest_cache
