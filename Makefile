# The two commands a newcomer needs: `make demo` and `make test`. Everything runs from .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Two stamps in one .venv: STAGES_STAMP once the three stages' requirements are in (all `make demo` and
# `make playground` need), STAMP once everything the suite needs is (dev.txt); `make test` completes a
# .venv that `make demo` made.
STAGES_STAMP := $(VENV)/.stages-stamp
STAMP  := $(VENV)/.installed-stamp
TRITON_VENV  := .venv-triton
TRITON_STAMP := $(TRITON_VENV)/.installed-stamp
DEMO_DIR ?= runs/demo
DEMO_BUDGET ?= 180

.PHONY: install lint test test-slow test-containers demo playground screenshots docs protos clean

NODE_STAMP := clients/node/node_modules/.package-lock.json

install: $(STAMP) $(TRITON_STAMP) node-install

# train.txt comes in through export.txt; serve.txt is onnxruntime, grpcio and the HTTP side (no torch).
$(STAGES_STAMP): requirements/train.txt requirements/export.txt requirements/serve.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -r requirements/export.txt -r requirements/serve.txt
	touch $(STAGES_STAMP)

$(STAMP): $(STAGES_STAMP) requirements/dev.txt requirements/docs.txt
	$(BIN)/python -m pip install --disable-pip-version-check -q -r requirements/dev.txt
	touch $(STAMP)

# tritonclient[grpc] requires protobuf<7 while the project pins protobuf 7, so the tritonclient side of the
# interop tests runs in an environment of its own; tests/tritonenv.py runs its Python as a subprocess.
$(TRITON_STAMP): requirements/tritonclient.txt
	test -x $(TRITON_VENV)/bin/python || $(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install --disable-pip-version-check -q -r requirements/tritonclient.txt
	touch $(TRITON_STAMP)

# The Node.js client's packages (for its tests): npm writes NODE_STAMP, so this reruns only when the
# lock file changes or node_modules is gone. Without npm the Node client tests skip, saying why.
.PHONY: node-install
node-install:
	@if command -v npm >/dev/null; then $(MAKE) --no-print-directory $(NODE_STAMP); \
	else echo "npm not found: skipping clients/node (its tests will skip)"; fi

$(NODE_STAMP): clients/node/package-lock.json
	npm ci --prefix clients/node --no-audit --no-fund

# ruff (bugs, style errors, import order) over the whole tree, mypy --strict over serve/ and export/ and
# at its defaults over train/, both configured in pyproject.toml; `make test` runs this first, so a lint
# failure fails the suite.
lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

test: install lint
	$(BIN)/python -m pytest

# The long runs the default suite leaves out (pyproject's addopts deselect `slow`): e.g. 2500 fuzz examples.
test-slow: install
	$(BIN)/python -m pytest -m slow

# Real images and containers on a Docker engine (tests/containers/): builds the CPU images (on local
# Debian stand-ins where no registry is reachable), `docker compose up`, calls through the published
# ports, the scale profile with a replica killed, `down -v`. Skips without an engine, fails under CI=true.
test-containers: install
	$(BIN)/python -m pytest -m containers tests/containers

# train (short) -> export -> start the server on a free port -> stream a sample through the client -> stop.
# --resume auto: a second `make demo` keeps the finished run (or continues an interrupted one); retrain from
# scratch with `rm -rf runs/demo` or `python -m train ... --overwrite`. It installs the stages only: not the
# test tools, .venv-triton or the Node.js client's modules, which the demo never uses.
demo: $(STAGES_STAMP)
	$(BIN)/python -m train --time-budget $(DEMO_BUDGET) --out $(DEMO_DIR) --resume auto
	$(BIN)/python -m export $(DEMO_DIR)
	@$(BIN)/python -m serve --model $(DEMO_DIR)/model.onnx --port 0 >$(DEMO_DIR)/serve.log 2>&1 & pid=$$!; \
	trap 'kill $$pid 2>/dev/null' EXIT; \
	for i in $$(seq 300); do grep -q '^charrnn serving' $(DEMO_DIR)/serve.log && break; \
		kill -0 $$pid 2>/dev/null || { cat $(DEMO_DIR)/serve.log; exit 1; }; sleep 0.1; done; \
	grep -m1 '^charrnn serving' $(DEMO_DIR)/serve.log; \
	target=$$(sed -n 's/^charrnn serving .* on \([^ ]*\) (.*/\1/p' $(DEMO_DIR)/serve.log); \
	$(BIN)/python -m serve.client generate --target $$target --prompt "The " --max-chars 400 --temperature 0.8
	@echo; echo "To watch the model think in a browser: make playground (then open the URL it prints)"

# The playground (serve/web/): serves the demo model with its page until Ctrl-C, training it first if
# runs/demo has no checkpoint; MODEL=lesson serves the seed lesson's model (runs/hihell) instead. Export
# runs every time (seconds), so a model.onnx written before the `hidden` output existed gets it.
MODEL ?= demo
LESSON_DIR ?= runs/hihell
PLAYGROUND_PORT ?= 8000
playground: $(STAGES_STAMP)
	@set -e; if [ "$(MODEL)" = lesson ]; then dir=$(LESSON_DIR); \
		test -f $$dir/checkpoint.pt || $(BIN)/python -m train --corpus hihell --out $$dir; \
	else dir=$(DEMO_DIR); \
		test -f $$dir/checkpoint.pt || $(BIN)/python -m train --time-budget $(DEMO_BUDGET) --out $$dir --resume auto; \
	fi; \
	$(BIN)/python -m export $$dir >/dev/null; \
	$(BIN)/python -m serve --model $$dir/model.onnx --port 0 --http-port $(PLAYGROUND_PORT) 2>&1 | \
		sed -u 's|^charrnn http on \(.*\)|&\nplayground: open \1/ in a browser (Ctrl-C stops the server)|'

# The documentation's pictures of the playground: the browser tests, writing their screenshots into docs/img
# (elsewhere they go to a temporary folder, so that `make test` leaves the tree clean), with the demo
# model where there is one (`make demo` trains it), else the suite's tiny model.
screenshots: install
	CHARRNN_SCREENSHOTS=docs/img CHARRNN_PLAYGROUND_MODEL=$$(test -f $(DEMO_DIR)/model.onnx && echo $(DEMO_DIR)/model.onnx) \
		$(BIN)/python -m pytest -q tests/serve/test_playground.py

# The documentation site (mkdocs.yml, docs/) built into site/, which git ignores; open site/index.html.
# `make test` builds it too, with --strict (tests/docs/test_site.py), so a broken link fails the suite.
docs: $(STAMP)
	$(BIN)/python -m mkdocs build --strict

# Regenerates the committed gRPC stubs in serve/api/pb/ from protos/. The -I mapping places each proto at
# serve/api/pb/<its path> for protoc (e.g. serve/api/pb/charrnn/v1/charrnn.proto), so generated imports
# read `serve.api.pb.charrnn.v1...` and `serve.api.pb.inference...` with no post-processing. protoc's
# --pyi_out types the messages, mypy-protobuf's plugin the services (*_pb2_grpc.pyi), so mypy checks the
# stubs' users. PROTO_OUT lets the stub test regenerate elsewhere and diff.
PROTOS := protos/charrnn/v1/charrnn.proto protos/inference/grpc_service.proto
PROTO_OUT ?= .
protos:
	$(BIN)/python -m grpc_tools.protoc -Iserve/api/pb=protos \
		--python_out=$(PROTO_OUT) --pyi_out=$(PROTO_OUT) --grpc_python_out=$(PROTO_OUT) \
		--plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc --mypy_grpc_out=$(PROTO_OUT) \
		$(PROTOS)

clean:
	rm -rf $(VENV) $(TRITON_VENV) runs site clients/node/node_modules
