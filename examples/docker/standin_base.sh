#!/usr/bin/env bash
# A local stand-in for NVIDIA's PyTorch container, for building and running the project's
# Dockerfile where nvcr.io cannot be reached (CI, the development machines): Debian trixie
# (Python 3.13) from Debian's archive with mmdebstrap, pip from its wheel, and torch 2.13.0 and
# triton 3.7.1 from PyPI (the versions requirements.txt pins and NGC 26.07 ships). It has no
# TransformerEngine, apex or CUDA driver: enough for the Dockerfile, unmodified
# (--build-arg BASE_IMAGE=<this tag>), and the CPU default command. tests/e2e/test_docker_image.py
# uses it.
#
#   examples/docker/standin_base.sh [TAG]   # prints TAG; builds it only if the engine lacks it
#
# Needs root (mmdebstrap, rootful podman), podman with runc (crun refuses cgroups v1 hybrid
# mode: set runtime = "runc" in containers.conf), and the network to deb.debian.org and PyPI.
# About 2.5 minutes on a 2-core machine. ENGINE (default podman); PYTHON (host Python with pip,
# default .venv/bin/python) downloads the pip wheel.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TAG="${1:-localhost/mhc-ngc-standin:trixie-torch2.13}"
ENGINE="${ENGINE:-podman}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
if "$ENGINE" image exists "$TAG"; then
  echo "$TAG"
  exit 0
fi
WORK="$(mktemp -d)"
ROOTFS="localhost/mhc-standin-rootfs:$$"
cleanup() { rm -rf "$WORK"; "$ENGINE" rmi -f "$ROOTFS" >/dev/null 2>&1 || true; }
trap cleanup EXIT

# python-is-python3: the Dockerfile runs `python`, as NGC's images have it. passwd: useradd.
mmdebstrap --quiet --variant=minbase \
  --include=python3,python-is-python3,ca-certificates,passwd,hostname trixie "$WORK/rootfs.tar"
"$ENGINE" import --quiet "$WORK/rootfs.tar" "$ROOTFS" >/dev/null
# pip from its wheel: Debian's python3-pip conflicts with a pip-installed `packaging`.
"$PYTHON" -m pip download --quiet --no-deps --dest "$WORK" pip
# The host's CA bundle: the index is reached through whatever the host trusts (PIP_CERT stays
# set in the image, so the Dockerfile's own pip runs use it too).
cp /etc/ssl/certs/ca-certificates.crt "$WORK/host-ca.crt"
cat >"$WORK/Containerfile" <<EOF
FROM $ROOTFS
COPY pip-*.whl host-ca.crt /opt/standin/
ENV PIP_CERT=/opt/standin/host-ca.crt PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN wheel="\$(ls /opt/standin/pip-*.whl)" \\
    && python "\${wheel}/pip" install --no-cache-dir "\${wheel}" \\
    && python -m pip install --no-cache-dir torch==2.13.0 triton==3.7.1 \\
    && python -c "import torch, triton; print(torch.__version__, triton.__version__)"
EOF
# --format docker: podman's default OCI format ignores SHELL, and the Dockerfile's pipefail
# checks would not run.
"$ENGINE" build --quiet --format docker --network host -t "$TAG" -f "$WORK/Containerfile" \
  "$WORK" >&2
echo "$TAG"
