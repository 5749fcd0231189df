# pcim: the two commands a new user types are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
TESTSTAMP := $(VENV)/.installed-test
DOCS_STAMP := $(VENV)/.docs-installed

.PHONY: install install-test demo test test-fast test-slurm lint bench bench-detail compare docs clean

# pcim and its runtime dependencies only (what `make demo` needs)
install: $(STAMP)

# CPU torch first (a pinned wheel); the package asks for a range, so GPU users keep their CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e .
	touch $(STAMP)

# ... plus the test extra: pytest, the linters and the libraries the suite checks pcim against
install-test: $(TESTSTAMP)

$(TESTSTAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(TESTSTAMP)

demo: install
	$(BIN)/pcim explain sample_plates/demo/plate.yaml
	@echo "maps: sample_plates/demo/out/DEMO01.zarr   summary: sample_plates/demo/out/DEMO01_pcim.csv   nuclei: sample_plates/demo/out/DEMO01_pcim_Nuclei.csv"

# every test (tests/conftest.py pins threads and seeds, so the results do not depend on the machine)
test: install-test
	$(BIN)/python -m pytest -q

# every module, without the long end-to-end runs (marked slow): a few minutes on 2 cores
test-fast: install-test
	$(BIN)/python -m pytest -q -m "not slow"

# pcim on a real one-node SLURM cluster (installs and starts slurm-wlm + munge; needs root): ~1-2 min
test-slurm: install-test
	bash scripts/slurm_up.sh
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m slurm tests/test_slurm.py

# ruff, and the layers of docs/development.md (import-linter: pyproject.toml [tool.importlinter])
lint: install-test
	$(BIN)/ruff check pcim_cli tests benchmarks sample_plates
	$(BIN)/lint-imports

# the speed goals (docs/speed.md), every figure measured in this one run: amortised vs per-image per map on
# every evaluation set, busy / quiet, per-image vs T x (forward + backward), a 2160 px field's fixed costs and
# store size, the driver at 1536 x 2 wells; one table on stdout, benchmarks/results/bench_throughput.json;
# ~10-15 min on 2 cores
bench: install-test
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_throughput.py

# the detailed speed tables (fit vs bound, batch sizes, objects, tiles: benchmarks/results/bench.json, 5-10 min)
# and amortised PCIM (training time, plate throughput, quality: bench_amortised.json, ~10 min)
bench-detail: install-test
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench.py
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_amortised.py

# how the defaults were chosen (docs/defaults.md); needs stardist's wheel from PyPI
compare: install-test
	$(BIN)/python benchmarks/compare_formulations.py

# the docs site: docs/ -> site/ (open site/index.html); --strict fails on broken links and anchors
$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf sample_plates/demo/out .pytest_cache site
