# The serving image for NVIDIA GPUs: onnxruntime-gpu on the CUDA runtime with cuDNN; no torch.
# onnxruntime-gpu 1.31 on PyPI is built for CUDA 13 and cuDNN 9 (its `cuda`/`cudnn` extras name
# nvidia-cuda-runtime ~=13.0 and nvidia-cudnn-cu13 ~=9.0), hence this base image.
#
#   docker build -f docker/serve-gpu.Dockerfile -t charrnn-serve:gpu .
#   docker run --gpus all -v charrnn_artifacts:/artifacts:ro -p 50051:50051 charrnn-serve:gpu
# The base is a build argument like the CPU images'; the default is the image users get.
ARG BASE_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Ubuntu's python3 (3.12 on 24.04). Not version-pinned: the Ubuntu archive drops superseded package
# versions, so a pin would break the build at the next security update; the base image tag and every
# Python package are pinned instead.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

RUN useradd --create-home --uid 10001 --user-group charrnn \
    && mkdir /artifacts \
    && chown charrnn:charrnn /artifacts

WORKDIR /app

COPY requirements/serve-gpu.txt requirements/
RUN pip install --no-cache-dir -r requirements/serve-gpu.txt

COPY serve/ serve/
# The project version lives in CHANGELOG.md: serve/ops/version.py reads it for GetModelInfo.
COPY CHANGELOG.md ./

USER 10001:10001
ENV CHARRNN_MODEL_REPOSITORY=/artifacts/models \
    CHARRNN_HOST=0.0.0.0 \
    CHARRNN_PORT=50051 \
    CHARRNN_HTTP_PORT=8080 \
    CHARRNN_DEVICE=cuda
EXPOSE 50051 8080

HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "serve.healthcheck", "--timeout", "3"]

CMD ["python", "-m", "serve"]
