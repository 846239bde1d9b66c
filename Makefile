# Two commands matter: `make run` and `make test`. Both set up what they need.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PROTO_SRC := protos/supervisor/v1/supervisor.proto
PROTO_OUT := supervisor_service/_proto
PROTO_GEN := $(PROTO_OUT)/supervisor/v1/supervisor_pb2.py

.PHONY: run test test-min bench profile soak report proto lint clean venv system-deps fuzz image demo

# Debian packages of the real servers some tests start on 127.0.0.1.
# Installed when missing and running as root; otherwise those tests skip
# (or fail under CI=true). PostgreSQL's server binaries are off PATH (/usr/lib/postgresql/*/bin):
# its package is probed by pg_ctlcluster, which postgresql-common (a dependency of the server) puts there.
SYSTEM_PACKAGES := prometheus:prometheus etcd:etcd-server pg_ctlcluster:postgresql
# The chaos suite compiles its clock shim and formats a small ext4 image for its disk faults.
SYSTEM_PACKAGES += gcc:gcc mkfs.ext4:e2fsprogs
# `make image` and its test: buildah builds and runs the image without a daemon (uidmap comes with it),
# mmdebstrap makes the Debian base image when it is not there.
SYSTEM_PACKAGES += buildah:buildah mmdebstrap:mmdebstrap

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_INSTALL_ARGS) -e '.[dev]'
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
	@echo "supervisor-service is installed in $(VENV)/bin: '. $(VENV)/bin/activate' in another shell puts it on PATH"
	$(VENV)/bin/supervisor-service serve

# A real failover on the embedded defaults within a minute: the service, simulated datanodes, one dies (README "Demo").
demo: proto
	$(VENV)/bin/supervisor-service demo

system-deps:
	@missing=""; for pair in $(SYSTEM_PACKAGES); do \
		command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			echo "installing$$missing"; apt-get update -qq && \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
		else echo "warning: missing Debian packages:$$missing (tests that need them will skip, or fail under CI=true)"; fi; \
	fi

test: proto system-deps
	$(PY) -m pytest -q

# The fuzz tests (README "Fuzzing") with FUZZ_EXAMPLES (default 10) times the examples `make test` runs,
# random seeds instead of the fixed ones, and failures kept in hypothesis's database (.hypothesis/).
FUZZ_EXAMPLES ?= 10
FUZZ_TESTS := tests/unit/test_fuzz_core_stateful.py tests/integration/test_fuzz_rpc.py \
	tests/integration/test_fuzz_heartbeat_stream.py tests/integration/test_fuzz_process.py

fuzz: proto
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q --timeout=0 $(FUZZ_TESTS)

# The dependency floor: every `>=` bound of pyproject.toml installed exactly, in a second venv, and
# the unit tests and the gRPC server's tests run on it (a few minutes; the first run installs).
# The generated protobuf code is not shared with .venv: code from a newer grpcio-tools needs a
# protobuf at least as new at import. So the sources are copied into $(MIN_SRC), without
# supervisor_service/_proto/supervisor, and this Makefile's own `proto` runs there with
# VENV=$(MIN_VENV): the floor's grpcio-tools generates the copy's code, the copy is installed
# (editable) under the floor's constraints, and the tests run in the copy. Run it with the oldest
# Python the project supports (`make test-min PYTHON=python3.11`): each floor must install there.
MIN_VENV := .venv-min
MIN_SRC  := $(MIN_VENV)/src
MIN_CONSTRAINTS := $(MIN_VENV)/constraints.txt

test-min:
	@[ -x $(MIN_VENV)/bin/python ] || $(PYTHON) -m venv $(MIN_VENV)
	$(PYTHON) -c 'import re, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
		reqs = p["dependencies"] + [r for extra in p["optional-dependencies"].values() for r in extra]; \
		print("\n".join(sorted({re.sub(r"\s*>=\s*([^,;\s]+).*", r"==\1", r) for r in reqs if ">=" in r})))' \
		> $(MIN_CONSTRAINTS)
	rm -rf $(MIN_SRC) && mkdir -p $(MIN_SRC)
	tar -c --exclude=__pycache__ --exclude=supervisor_service/_proto/supervisor \
		Makefile pyproject.toml README.md Dockerfile .dockerignore deploy protos supervisor_service tests | tar -x -C $(MIN_SRC)
	$(MAKE) --no-print-directory -C $(MIN_SRC) proto VENV=$(CURDIR)/$(MIN_VENV) \
		PIP_INSTALL_ARGS="-c $(CURDIR)/$(MIN_CONSTRAINTS)"
	$(MIN_VENV)/bin/python -m pip list --format=freeze | grep -iE '^(grpcio|protobuf|pydantic|prometheus|numpy|aetcd)'
	cd $(MIN_SRC) && $(CURDIR)/$(MIN_VENV)/bin/python -m pytest -q -p no:cacheprovider \
		tests/unit tests/integration/test_server.py

# The scale benchmark (README "Performance"): `make bench`, or `make bench BENCH_ARGS=--quick` (a few minutes);
# `make bench BENCH_ARGS=--curve`: the cost as the work grows, 10k to 3M detectors, best and worst case.
bench: proto
	$(PY) -m supervisor_service.bench $(BENCH_ARGS)

# Where the service's CPU goes under the stamped 1,000-regions flood: py-spy (a dev dependency) records
# the service's process, the top entries are printed. `PROFILE_ARGS="--seconds 20 --datanodes 500"`.
profile: proto
	$(PY) -m supervisor_service.bench --profile $(PROFILE_ARGS)

# The soak (README "Soak"): the real service for SOAK_MINUTES (default 10) under churn, stalls and Dumps.
soak: proto
	$(PY) -m supervisor_service.bench.soak $(SOAK_ARGS)

# The seeded chaos suite (README "Chaos testing"): three replicas on a three-member etcd under a nemesis, then
# the invariants checked on the recorded history; exits 1 on any violation. CHAOS_SEED (default 1),
# CHAOS_MINUTES (default 3, the whole run), CHAOS_ARGS (e.g. "--seeds 1,2,3", "--scenario disk").
CHAOS_SEED ?= 1
CHAOS_MINUTES ?= 3
.PHONY: chaos
chaos: proto system-deps
	CHAOS_SEED=$(CHAOS_SEED) CHAOS_MINUTES=$(CHAOS_MINUTES) $(PY) -m tests.chaos $(CHAOS_ARGS)

# The detection-quality report committed in docs/ (README "Detection quality"): about two minutes on two cores.
report: proto
	$(VENV)/bin/supervisor-service evaluate --out docs

# pyflakes, the import order (ruff), and the core type-checked strictly (mypy; see pyproject.toml).
# Under a minute (mypy's cache makes later runs faster); not part of `make test`.
lint: proto
	$(PY) -m compileall -q supervisor_service tests
	$(PY) -m pyflakes $$(find supervisor_service tests -name '*.py' -not -path '*/_proto/*')
	$(VENV)/bin/ruff check --select I supervisor_service tests
	$(PY) -m mypy --strict supervisor_service/core

# The container image (README "Container image"): docker, podman or buildah, whichever works here;
# the Debian base made locally when missing. `make image IMAGE=name:tag`.
IMAGE ?= region-supervisor:latest
image: system-deps
	IMAGE=$(IMAGE) deploy/image/build.sh

clean:
	rm -rf $(VENV) $(MIN_VENV) $(PROTO_OUT)/supervisor data .pytest_cache .mypy_cache
