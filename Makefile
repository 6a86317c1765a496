# Two commands matter: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo
CORES ?= 2

.PHONY: venv demo test test-slurm lint clean-demo

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: venv
	$(BIN)/python -m pipeline.synthetic $(DEMO_DIR)/slides --n 10 --seed 0
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/snakemake --cores $(CORES) --configfile config.yaml \
	  --config slides_dir=$(DEMO_DIR)/slides labels_csv=$(DEMO_DIR)/slides/labels.csv results_dir=$(DEMO_DIR)/results \
	  "mil={folds: 3}"
	@echo ""
	@echo "Demo finished. Results are in $(DEMO_DIR)/results:"
	@echo "  tissue QC      $(DEMO_DIR)/results/tissue/<slide>/thumbnail.png"
	@echo "  feature bags   $(DEMO_DIR)/results/features/"
	@echo "  MIL metrics    $(DEMO_DIR)/results/mil/"

# The SLURM tests (marker `slurm`) are left to `make test-slurm`, whether or not a cluster is running here.
test: venv
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q -m "not slurm" $(PYTEST_ARGS)

# Real single-node SLURM on this machine (installs Debian packages, starts munge/slurmctld/slurmd).
test-slurm: venv
	.ci/slurm-setup.sh
	WSIPIPE_REQUIRE_SLURM=1 PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q tests/test_slurm.py

lint: venv
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/snakemake --lint --config slides_dir=tests results_dir=/tmp/wsipipe-lint

clean-demo:
	rm -rf $(DEMO_DIR)
