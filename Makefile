# Everything a fresh machine with Python 3.11+ and pip needs.
#   make test    create .venv, install pinned dependencies, run the test suite
#   make test-gpu on a CUDA host: the GPU tests, on its GPUs
#   make serve   start gemma-serve on the built-in default model (random weights)
#   make bench   run the benchmarks (prints tables)
#   make bench-real  the real-size benchmark (gemma2_2b architecture, random weights)
#                against transformers: installs the bench extra (torch, CPU build)
#   make soak    run the 5-minute load and soak test
#   make protos  regenerate coordinator/generated from protos/
#   make lock    re-pin constraints.txt from the current .venv

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# keras_hub is the reference our tests check file compatibility against. Its
# metadata demands tensorflow-text, which its backbones do not import, so it
# is installed without dependencies, next to the few it does import.
REFERENCE_PKGS := keras-hub absl-py regex rich tokenizers
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

.PHONY: setup test test-gpu serve bench bench-real soak protos lock clean

setup: $(STAMP)

$(STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt $(REFERENCE_PKGS)
	rm -f $(VENV)/.installed-*
	touch $@

# pytest exits 5 when it collected nothing: say so and fail, so that an empty
# run is never mistaken for a green one.
test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

# On a CUDA host: JAX's CUDA plugin, then the tests marked gpu
# (tests/test_on_gpu.py) on its GPUs; the CPU suite leaves them out.
test-gpu: setup
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[cuda]"
	JAX_PLATFORMS=cuda $(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

serve: setup
	$(BIN)/gemma-serve $(SERVE_ARGS)

protos: setup
	$(BIN)/python -m grpc_tools.protoc -Icoordinator/generated=protos --python_out=. \
	  --pyi_out=. --grpc_python_out=. $(patsubst protos/%,coordinator/generated/%,$(wildcard protos/gemma/v1/*.proto))

bench: setup
	$(BIN)/python benchmarks/forward_throughput.py
	$(BIN)/python benchmarks/service_throughput.py --worker-cores 1
	$(BIN)/python benchmarks/service_throughput.py
	$(BIN)/python benchmarks/ray_call_overhead.py
	$(BIN)/python benchmarks/adapter_throughput.py
	$(BIN)/python benchmarks/http_embeddings.py

# Writes (once) a 5.2 GB checkpoint under ~/.cache/gemma-serve-bench and holds
# one model at a time (up to 16.5 GB, float32); an hour or more on 2 cores.
# Pass flags with BENCH_REAL_ARGS, e.g. BENCH_REAL_ARGS="--cases inproc --repeats 3".
bench-real: setup
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[bench]"
	$(BIN)/python benchmarks/real_size.py $(BENCH_REAL_ARGS)

soak: setup
	$(BIN)/python benchmarks/soak.py

lock: setup
	{ echo "# Pinned versions for reproducible installs (pip install -c constraints.txt ...)."; \
	  echo "# Regenerate with: make lock"; \
	  $(BIN)/python -m pip freeze --exclude-editable | grep -v "^-e" \
	  | sed "s|^keras-hub @ .*|keras-hub==0.32.0|"; } > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache
