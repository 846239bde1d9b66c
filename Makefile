# Two commands matter: `make run` and `make test`. Both set up what they need.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PROTO_SRC := protos/supervisor/v1/supervisor.proto
PROTO_OUT := supervisor_service/_proto
PROTO_GEN := $(PROTO_OUT)/supervisor/v1/supervisor_pb2.py

.PHONY: run test bench soak proto lint clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

proto: $(PROTO_GEN)

# Generated code is not committed: it is produced here from protos/ and
# imported only by supervisor_service/proto.py. The sed turns the absolute
# import that protoc writes into the grpc module into a relative one.
$(PROTO_GEN): $(PROTO_SRC) $(STAMP)
	mkdir -p $(PROTO_OUT)/supervisor/v1
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=$(PROTO_OUT) --pyi_out=$(PROTO_OUT) \
		--grpc_python_out=$(PROTO_OUT) $(PROTO_SRC)
	sed -i 's/^from supervisor\.v1 import/from . import/' $(PROTO_OUT)/supervisor/v1/supervisor_pb2_grpc.py
	touch $(PROTO_OUT)/supervisor/__init__.py $(PROTO_OUT)/supervisor/v1/__init__.py

run: proto
	$(VENV)/bin/supervisor-service serve

test: proto
	$(PY) -m pytest -q

bench: proto
	$(PY) -m supervisor_service.bench

lint: proto
	$(PY) -m compileall -q supervisor_service tests

clean:
	rm -rf $(VENV) $(PROTO_OUT)/supervisor data .pytest_cache
