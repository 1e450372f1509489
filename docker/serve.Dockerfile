# The serving image (CPU): onnxruntime, grpcio, protobuf and numpy; no torch, no train/ or export/.
# It reads one file, the exported model, from the artifacts volume.
#
#   docker build -f docker/serve.Dockerfile -t charrnn-serve .
#   docker run -v charrnn_artifacts:/artifacts:ro -p 50051:50051 charrnn-serve
# The base is a build argument so CI can build on a local stand-in of the same Debian release
# when no registry is reachable (tests/containers/images.py); the default is the image users get.
ARG BASE_IMAGE=python:3.11.13-slim-bookworm
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Same uid as the training image; /artifacts owned by it so a fresh volume mounted here first stays
# writable for the training container.
RUN useradd --create-home --uid 10001 --user-group charrnn \
    && mkdir /artifacts \
    && chown charrnn:charrnn /artifacts

WORKDIR /app

COPY requirements/serve.txt requirements/
RUN pip install --no-cache-dir -r requirements/serve.txt

COPY serve/ serve/
# The project version lives in CHANGELOG.md: serve/ops/version.py reads it for GetModelInfo.
COPY CHANGELOG.md ./

USER 10001:10001
ENV CHARRNN_MODEL_REPOSITORY=/artifacts/models \
    CHARRNN_HOST=0.0.0.0 \
    CHARRNN_PORT=50051 \
    CHARRNN_HTTP_PORT=8080
EXPOSE 50051 8080

# A gRPC Health/Check call, not a TCP poke: healthy once the model is loaded and the server SERVING.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "serve.healthcheck", "--timeout", "3"]

CMD ["python", "-m", "serve"]
