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

BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $(BENCH_STAMP)

# Speed/memory benchmarks (results in bench/results/*.json; figures copied into BENCHMARKS.md)
bench: $(BENCH_STAMP)
	$(PY) bench/embed.py --int8
	$(PY) bench/train.py
	$(PY) bench/eval.py
	$(PY) bench/scale.py

clean:
	rm -rf runs .cliplab-cache
