# CI stand-in for python:3.11.13-slim-bookworm when no registry can be reached: Debian bookworm's own
# python3 (3.11.x, the same minor version) in a venv on PATH, so `python` and `pip` behave as in the
# official image. BASE is a bookworm root file system made by debootstrap and `docker import`
# (tests/containers/images.py builds it; nothing here is used by a user who can pull the real image).
#
# The build context holds one file, this machine's CA bundle: pip inside `docker build` reaches the
# package index only through it.
ARG BASE=charrnn-standin/debian:bookworm
FROM ${BASE}

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt

# Debian's archive, not pinned: the stand-in follows the release as the official image does.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/python \
    && ln -s /opt/python/bin/python /usr/local/bin/python
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
ENV PATH=/opt/python/bin:$PATH
CMD ["python3"]
