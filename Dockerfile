# syntax=docker/dockerfile:1
# region-supervisor: `make image` (deploy/image/build.sh) builds this with docker, podman or buildah;
# `docker build -t region-supervisor .` works as well. Debian bookworm's own python3 (3.11) in a venv.
#
# BASE_IMAGE: debian:bookworm-slim, or the same made locally from Debian's packages
# (localhost/debian:bookworm-slim, see deploy/image/build.sh). PIP_INDEX_URL, PIP_EXTRA_INDEX_URL:
# another index of Python packages than PyPI, for the build only; the build secret pip_cert: a CA
# bundle for pip (`--secret id=pip_cert,src=FILE`).
ARG BASE_IMAGE=debian:bookworm-slim

# Build stage: the generated protobuf modules, the wheel, and a venv holding it and its dependencies.
FROM ${BASE_IMAGE} AS build
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && apt-get clean && rm -rf /var/lib/apt/lists/*
# What every pip step reads first: an empty PIP_*_URL is not "no index", so it is unset unless given; a
# CA bundle given as the build secret pip_cert (a proxy that re-signs TLS) is used, never stored in a layer.
RUN printf '%s\n' '[ -n "${PIP_INDEX_URL:-}" ] || unset PIP_INDEX_URL' \
      '[ -n "${PIP_EXTRA_INDEX_URL:-}" ] || unset PIP_EXTRA_INDEX_URL' \
      '[ ! -f /run/secrets/pip_cert ] || export PIP_CERT=/run/secrets/pip_cert' > /opt/pip-env
RUN --mount=type=secret,id=pip_cert . /opt/pip-env \
 && python3 -m venv /opt/build \
 && /opt/build/bin/pip install -q "grpcio-tools>=1.64,<2" \
 && python3 -m venv --without-pip /opt/venv
WORKDIR /src
# The dependencies first, from pyproject.toml alone: a change of the code does not download them again.
COPY pyproject.toml ./
RUN --mount=type=secret,id=pip_cert . /opt/pip-env \
 && python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
      > /tmp/requirements.txt \
 && /opt/build/bin/pip --python /opt/venv/bin/python install -q -r /tmp/requirements.txt
COPY README.md ./
COPY protos ./protos
COPY supervisor_service ./supervisor_service
# What `make proto` does (see the Makefile): generate, then make protoc's one absolute import relative.
RUN --mount=type=secret,id=pip_cert . /opt/pip-env \
 && rm -rf supervisor_service/_proto/supervisor \
 && mkdir -p supervisor_service/_proto/supervisor/v1 \
 && /opt/build/bin/python -m grpc_tools.protoc -Iprotos --python_out=supervisor_service/_proto \
      --grpc_python_out=supervisor_service/_proto protos/supervisor/v1/supervisor.proto \
 && sed -i 's/^from supervisor\.v1 import/from . import/' supervisor_service/_proto/supervisor/v1/supervisor_pb2_grpc.py \
 && touch supervisor_service/_proto/supervisor/__init__.py supervisor_service/_proto/supervisor/v1/__init__.py \
 && /opt/build/bin/pip wheel -q --no-deps --wheel-dir /dist . \
 && /opt/build/bin/pip --python /opt/venv/bin/python install -q --no-deps /dist/*.whl \
 && /opt/venv/bin/python -c 'import supervisor_service.proto'

# Runtime stage: Debian's python3 and the venv; no compiler, no pip, no build tools.
FROM ${BASE_IMAGE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 \
 && apt-get clean && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 supervisor \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/supervisor --no-create-home \
      --shell /usr/sbin/nologin supervisor \
 && install -d -o 10001 -g 0 -m 0770 /var/lib/supervisor
COPY --from=build /opt/venv /opt/venv
# Listen on every interface (a container's port is reached from outside it); state in the volume.
# The modules are compiled at install: nothing is written next to them (a read-only root works).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SUPERVISOR_GRPC_ADDR=0.0.0.0:50051 \
    SUPERVISOR_METRICS_ADDR=0.0.0.0:9464 \
    SUPERVISOR_DATA_DIR=/var/lib/supervisor \
    SUPERVISOR_LOG_FORMAT=json
# Numeric, so that a runtime can tell it is not root without reading /etc/passwd (runAsNonRoot). The data
# directory is also the root group's, as OpenShift expects of an image it runs under an arbitrary uid
# (of group 0); any other user cannot enter it, and the service cannot start there.
USER 10001:10001
WORKDIR /var/lib/supervisor
VOLUME ["/var/lib/supervisor"]
EXPOSE 50051 9464
# SIGTERM starts the graceful shutdown (README "Shutdown"); exec form, so it reaches Python directly.
STOPSIGNAL SIGTERM
# grpc.health.v1 Check on the gRPC port: exit 0 only while SERVING. buildah and podman keep this only
# in the docker image format (--format docker).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["supervisor-service", "health", "--timeout", "3"]
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="region-supervisor" \
      org.opencontainers.image.description="Failover supervisor for distributed storage clusters: phi-accrual detection per region, failover through remote gRPC services." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="debian:bookworm-slim"
ENTRYPOINT ["supervisor-service"]
CMD ["serve"]
