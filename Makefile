# pcim: the two commands a new user types are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.docs-installed

.PHONY: install demo test test-fast test-slurm lint bench compare docs clean

install: $(STAMP)

# CPU torch first (a pinned wheel); the package asks for a range, so GPU users keep their CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: install
	$(BIN)/pcim explain sample_plates/demo/plate.yaml
	@echo "maps: sample_plates/demo/out/DEMO01.zarr   summary: sample_plates/demo/out/DEMO01_pcim.csv   nuclei: sample_plates/demo/out/DEMO01_pcim_Nuclei.csv"

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# pcim on a real one-node SLURM cluster (installs and starts slurm-wlm + munge; needs root): ~1-2 min
test-slurm: install
	bash scripts/slurm_up.sh
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m slurm tests/test_slurm.py

lint: install
	$(BIN)/ruff check pcim_cli tests benchmarks sample_plates

# speed on this machine (one torch thread): table on stdout, benchmarks/results/bench.json; about 5-10 min;
# then amortised PCIM (training time, plate throughput, quality): benchmarks/results/bench_amortised.json, ~10 min
bench: install
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench.py
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_amortised.py

# how the defaults were chosen (docs/defaults.md); needs stardist's wheel from PyPI
compare: install
	$(BIN)/python benchmarks/compare_formulations.py

# the docs site: docs/ -> site/ (open site/index.html); --strict fails on broken links and anchors
$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf sample_plates/demo/out .pytest_cache site
