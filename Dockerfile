# mhc_megatron for reproducing runs: NVIDIA's PyTorch container plus this project and the pinned
# megatron-core. How to build and run it (Docker, SLURM with enroot/pyxis):
# examples/docker/README.md. tests/e2e/test_docker_*.py check this file without an engine;
# tests/e2e/test_docker_image.py builds and runs it with podman against a local stand-in base.
#
# Base: nvcr.io/nvidia/pytorch:26.07-py3. Why this tag: megatron-core 0.19.2 needs Python >= 3.12,
# and its torch 2.13 / Triton 3.7.1 are the versions requirements.txt pins (what the CPU tests
# run), so the GPU image and the test venv differ only in NVIDIA's build of them; 26.08 moved to
# torch 2.14.0a0. It brings TransformerEngine and apex built against that torch.
# Verified (November 2026, from public records found by search, not by pulling the image):
#   - third-party runs in 26.07-py3 record Python 3.12.3, torch 2.13.0a0+9186a08b2c.nv26.07,
#     CUDA 13.3, Triton 3.7.1 and TransformerEngine 2.17;
#   - NVIDIA's release notes (25.12, the newest the search had) put the container's packages in
#     /usr/local/lib/python3.12/dist-packages and pin them in /etc/pip/constraint.txt (since 25.03).
# Not verified: NVIDIA's own 26.07 release notes, the image digest (pinned by tag only: record the
# digest of the image you pull, examples/docker/build.sh prints it), and a build of this file on
# that base (it is built on a stand-in: Debian with PyPI's torch 2.13, tests/e2e/test_docker_image.py).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:26.07-py3
FROM ${BASE_IMAGE}

# pipefail: a failing `pip list` in a pipe must fail the build, not feed an empty file on.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Packages the base image provides, built for its CUDA (and TransformerEngine and apex against its
# torch): left out of the requirements.txt install, and held at the image's versions.
ARG CONTAINER_PROVIDED="torch triton"
# Build-time pip settings only (ARG, not ENV): no version check, and the image's Python is the
# environment to install into (Ubuntu marks it externally managed).
ARG PIP_DISABLE_PIP_VERSION_CHECK=1
ARG PIP_BREAK_SYSTEM_PACKAGES=1

# CUDA_DEVICE_MAX_CONNECTIONS=1: Megatron-Core 0.19.2 asserts it for tensor or context parallelism
# on GPUs before Blackwell (training/arguments.py): with one hardware queue, kernels start in the
# order they were issued, which its overlap of communication with compute relies on.
ENV PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1

# The user runs execute as. A fixed UID, so that files written to mounted volumes have a known
# owner; build with --build-arg USER_UID=$(id -u) --build-arg USER_GID=$(id -g) to match yours.
# Ubuntu's images already hold a user and a group with id 1000: they are replaced.
ARG USER_NAME=mhc
ARG USER_UID=1000
ARG USER_GID=1000
RUN if [ "${USER_UID}" = 0 ] || [ "${USER_GID}" = 0 ]; then \
        echo "USER_UID/USER_GID 0 is root; choose another id" >&2; exit 1; \
    fi \
    && old_user="$(getent passwd "${USER_UID}" | cut -d: -f1 || true)" \
    && if [ -n "${old_user}" ]; then userdel --remove "${old_user}" 2>/dev/null || true; fi \
    && old_group="$(getent group "${USER_GID}" | cut -d: -f1 || true)" \
    && if [ -n "${old_group}" ]; then groupdel "${old_group}"; fi \
    && groupadd --gid "${USER_GID}" "${USER_NAME}" \
    && useradd --uid "${USER_UID}" --gid "${USER_GID}" --create-home --shell /bin/bash \
        "${USER_NAME}"

WORKDIR /workspace/mhc_megatron

# 1. Dependencies, before the source so that editing code does not re-run pip.
COPY requirements.txt ./
# requirements.txt minus the lines naming a CONTAINER_PROVIDED package. It is read from the file
# itself, so a dependency added there is installed here too. tests/e2e/test_docker_install.py runs this step
# on requirements.txt and compares what it keeps.
RUN names="$(echo "${CONTAINER_PROVIDED}" | xargs | tr ' ' '|')" \
    && grep -viE "^[[:space:]]*(${names})([^A-Za-z0-9._-]|$)" requirements.txt \
        > requirements.container.txt

# 2. Install them with the image's torch, triton, TransformerEngine and apex pinned to the exact
# versions it ships, so that pip keeps them or fails, never replaces them. This constraint file
# takes the place of the image's /etc/pip/constraint.txt, which pins every package it ships and
# would refuse requirements.txt's own pins (numpy, packaging, ...). Then check that the held
# packages are unchanged and that torch works with the numpy installed.
RUN names="$(echo "${CONTAINER_PROVIDED}" | xargs | tr ' ' '|')" \
    && held="^(${names}|transformer[-_]engine[-_a-z0-9]*|apex)==" \
    && mkdir -p /etc/pip \
    && python -m pip list --format=freeze | grep -iE "${held}" | sort \
        > /etc/pip/mhc-constraint.txt \
    && for name in ${CONTAINER_PROVIDED}; do \
           grep -qi "^${name}==" /etc/pip/mhc-constraint.txt \
           || { echo "the base image has no ${name}; remove it from CONTAINER_PROVIDED" >&2; \
                exit 1; }; \
       done \
    && PIP_CONSTRAINT=/etc/pip/mhc-constraint.txt \
        python -m pip install --no-cache-dir -r requirements.container.txt \
    && python -m pip list --format=freeze | grep -iE "${held}" | sort \
        | diff /etc/pip/mhc-constraint.txt - \
    && python -c "import numpy, torch; torch.from_numpy(numpy.zeros(1))"
# Later pip runs (the project's below, a user's own) hold the same packages.
ENV PIP_CONSTRAINT=/etc/pip/mhc-constraint.txt

# 3. The project: the checkout minus .dockerignore, owned by the run user (runs/ is written here).
# --no-deps: its dependencies are the ones installed above, and pyproject.toml's unpinned torch
# and triton must not pull anything in.
COPY --chown=${USER_NAME}:${USER_NAME} . .
RUN python -m pip install --no-cache-dir --no-deps -e . \
    && mkdir -p runs \
    && chown "${USER_UID}:${USER_GID}" . runs

USER ${USER_NAME}

# No ENTRYPOINT here: the base image's (/opt/nvidia/nvidia_entrypoint.sh, NVIDIA's set-up of the
# container) runs this command or the one given. The default is the README's embedded default:
# the tiny MoE mHC model, on CPU.
CMD ["examples/tiny/train.sh"]
