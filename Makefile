# The two commands a new user types: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# DeepSpeed builds its CPU Adam op (the *_offload configs' optimizer) on first use: minutes of C++. The install builds
# it once into the venv (its build paths are the venv's), so no test or offload run waits for the compiler.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: install demo test bench lint clean

$(STAMP): pyproject.toml .ci/constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c .ci/constraints.txt -e '.[dev,hf,video,stream]'
	$(BIN)/python -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()" >/dev/null 2>&1 \
		|| echo "warning: DeepSpeed's CPU Adam op did not build (only configs/lvm/*_offload.yaml need it)"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python main.py demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf runs demo_out bench/results/*.json .pytest_cache
