# The two commands a newcomer needs: `make demo` and `make test`. Everything runs from .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO_DIR ?= runs/demo
DEMO_BUDGET ?= 180

.PHONY: install test demo protos clean

install: $(STAMP)

$(STAMP): requirements/train.txt requirements/export.txt requirements/serve.txt requirements/dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -r requirements/dev.txt
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest

demo: install
	$(BIN)/python -m train --time-budget $(DEMO_BUDGET) --out $(DEMO_DIR)
	$(BIN)/python -m export $(DEMO_DIR)
	$(BIN)/python -m export.sample $(DEMO_DIR)/model.onnx --prompt "The " --chars 400

# Regenerates the committed gRPC stubs in serve/pb/ from protos/. The -I mapping places the proto at
# serve/pb/charrnn/v1/charrnn.proto for protoc, so generated imports read `serve.pb.charrnn.v1...`
# with no post-processing. PROTO_OUT lets the stub test regenerate elsewhere and diff.
PROTO_OUT ?= .
protos:
	$(BIN)/python -m grpc_tools.protoc -Iserve/pb=protos \
		--python_out=$(PROTO_OUT) --pyi_out=$(PROTO_OUT) --grpc_python_out=$(PROTO_OUT) \
		protos/charrnn/v1/charrnn.proto

clean:
	rm -rf $(VENV) runs
