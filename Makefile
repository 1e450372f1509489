# The two commands a newcomer needs: `make demo` and `make test`. Everything runs from .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO_DIR ?= runs/demo
DEMO_BUDGET ?= 180

.PHONY: install test test-slow demo protos clean

NODE_STAMP := clients/node/node_modules/.package-lock.json

install: $(STAMP) node-install

$(STAMP): requirements/train.txt requirements/export.txt requirements/serve.txt requirements/dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -r requirements/dev.txt
	touch $(STAMP)

# The Node.js client's packages (for its tests): npm writes NODE_STAMP, so this reruns only when the
# lock file changes or node_modules is gone. Without npm the Node client tests skip, saying why.
.PHONY: node-install
node-install:
	@if command -v npm >/dev/null; then $(MAKE) --no-print-directory $(NODE_STAMP); \
	else echo "npm not found: skipping clients/node (its tests will skip)"; fi

$(NODE_STAMP): clients/node/package-lock.json
	npm ci --prefix clients/node --no-audit --no-fund

test: install
	$(BIN)/python -m pytest

# The long runs the default suite leaves out (pyproject's addopts deselect `slow`): e.g. 2500 fuzz examples.
test-slow: install
	$(BIN)/python -m pytest -m slow

# train (short) -> export -> start the server on a free port -> stream a sample through the client -> stop.
# --resume auto: a second `make demo` keeps the finished run (or continues an interrupted one); retrain from
# scratch with `rm -rf runs/demo` or `python -m train ... --overwrite`.
demo: install
	$(BIN)/python -m train --time-budget $(DEMO_BUDGET) --out $(DEMO_DIR) --resume auto
	$(BIN)/python -m export $(DEMO_DIR)
	@$(BIN)/python -m serve --model $(DEMO_DIR)/model.onnx --port 0 >$(DEMO_DIR)/serve.log 2>&1 & pid=$$!; \
	trap 'kill $$pid 2>/dev/null' EXIT; \
	for i in $$(seq 300); do grep -q '^charrnn serving' $(DEMO_DIR)/serve.log && break; \
		kill -0 $$pid 2>/dev/null || { cat $(DEMO_DIR)/serve.log; exit 1; }; sleep 0.1; done; \
	head -n1 $(DEMO_DIR)/serve.log; \
	target=$$(sed -n 's/^charrnn serving .* on \([^ ]*\) (.*/\1/p' $(DEMO_DIR)/serve.log); \
	$(BIN)/python -m serve.client generate --target $$target --prompt "The " --max-chars 400 --temperature 0.8

# Regenerates the committed gRPC stubs in serve/pb/ from protos/. The -I mapping places the proto at
# serve/pb/charrnn/v1/charrnn.proto for protoc, so generated imports read `serve.pb.charrnn.v1...`
# with no post-processing. PROTO_OUT lets the stub test regenerate elsewhere and diff.
PROTO_OUT ?= .
protos:
	$(BIN)/python -m grpc_tools.protoc -Iserve/pb=protos \
		--python_out=$(PROTO_OUT) --pyi_out=$(PROTO_OUT) --grpc_python_out=$(PROTO_OUT) \
		protos/charrnn/v1/charrnn.proto

clean:
	rm -rf $(VENV) runs clients/node/node_modules
