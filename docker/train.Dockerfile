# The training image: torch with train/ and export/. It runs both one-shot compose services,
# `python -m train --out /artifacts ...` and then `python -m export /artifacts`.
#
#   docker build -f docker/train.Dockerfile -t charrnn-train .                       # CPU torch
#   docker build -f docker/train.Dockerfile --build-arg TORCH_INDEX= -t charrnn-train:gpu .
#
# TORCH_INDEX is an extra package index for torch: the CPU-only wheels by default (a few hundred MB
# instead of several GB). Empty means PyPI's own torch wheel, which is the CUDA build and brings its
# CUDA libraries as pip packages, so the GPU variant needs no CUDA base image: the NVIDIA container
# toolkit supplies the driver. Both install the torch version pinned in requirements/train.txt.
# The base is a build argument so CI can build on a local stand-in of the same Debian release
# when no registry is reachable (tests/containers/images.py); the default is the image users get.
ARG BASE_IMAGE=python:3.11.13-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed uid shared with the serving image, so files on the artifacts volume read the same in both.
RUN useradd --create-home --uid 10001 --user-group charrnn \
    && mkdir /artifacts \
    && chown charrnn:charrnn /artifacts

WORKDIR /app

# Dependencies first: code edits do not reinstall torch.
COPY requirements/train.txt requirements/export.txt requirements/
RUN pip install --no-cache-dir ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} -r requirements/export.txt

COPY train/ train/
COPY export/ export/

USER 10001:10001
CMD ["python", "-m", "train", "--help"]
