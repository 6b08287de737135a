# All set-up happens here: `make demo` and `make test` create .venv when missing and install cliplab.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DATA   ?= ../shared/data/flickr8k
RUN    ?= runs/demo

.PHONY: install demo test bench clean report

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cliplab demo --data $(DATA) --run-dir $(RUN)

# Debian's Chromium, for the test that opens the HTML report headless (driven by Playwright)
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	@command -v apt-get >/dev/null || { echo "install Chromium (needed by tests/test_viz.py)"; exit 1; }
	@SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null

test: $(STAMP) $(CHROMIUM)
	CLIPLAB_REQUIRE_BROWSER=1 $(PY) -m pytest

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

# The shareable report: Flickr8k demo (ConSE baseline vs trained heads) + CIFAR-10 zero-shot and probe
CIFAR  ?= ../shared/data/cifar10
report: $(STAMP) $(CHROMIUM)
	test -f $(RUN)/plots/curves.png || $(VENV)/bin/cliplab demo --data $(DATA) --run-dir $(RUN)
	$(VENV)/bin/cliplab zeroshot $(CIFAR) -m conse -v photo -v negated -v simple7 --plots --run-dir runs/cifar10-zeroshot
	$(VENV)/bin/cliplab probe $(CIFAR) -m conse --method logistic --variant negated --plots --run-dir runs/cifar10-probe
	$(VENV)/bin/cliplab report $(RUN) runs/cifar10-zeroshot runs/cifar10-probe -o runs/report.html \
		--title "cliplab: Flickr8k retrieval and CIFAR-10 classification" --screenshots docs

clean:
	rm -rf runs .cliplab-cache
