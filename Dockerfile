# syntax=docker/dockerfile:1
# Build stage: generate the protobuf modules and build a wheel.
FROM python:3.11-slim AS build
WORKDIR /src
RUN pip install --no-cache-dir "grpcio-tools>=1.64,<2" build
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY supervisor_service ./supervisor_service
RUN mkdir -p supervisor_service/_proto/supervisor/v1 \
 && python -m grpc_tools.protoc -Iprotos --python_out=supervisor_service/_proto \
      --grpc_python_out=supervisor_service/_proto protos/supervisor/v1/supervisor.proto \
 && sed -i 's/^from supervisor\.v1 import/from . import/' supervisor_service/_proto/supervisor/v1/supervisor_pb2_grpc.py \
 && touch supervisor_service/_proto/supervisor/__init__.py supervisor_service/_proto/supervisor/v1/__init__.py \
 && python -m build --wheel --outdir /dist .

# Runtime stage: the wheel and its dependencies, a non-root user, nothing else.
FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/supervisor --create-home supervisor
COPY --from=build /dist/*.whl /tmp/
RUN pip install --no-cache-dir /tmp/*.whl && rm /tmp/*.whl
USER supervisor
WORKDIR /var/lib/supervisor
ENV SUPERVISOR_GRPC_ADDR=0.0.0.0:50051 \
    SUPERVISOR_METRICS_ADDR=0.0.0.0:9464 \
    SUPERVISOR_LOG_FORMAT=json
EXPOSE 50051 9464
# Exec form: SIGTERM reaches Python directly and starts the graceful shutdown.
ENTRYPOINT ["supervisor-service"]
CMD ["serve"]
