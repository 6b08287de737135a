# All set-up happens here: `make demo` and `make test` create .venv when missing and install cliplab.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DATA   ?= ../shared/data/flickr8k
RUN    ?= runs/demo

.PHONY: install demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cliplab demo --data $(DATA) --run-dir $(RUN)

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf runs .cliplab-cache
