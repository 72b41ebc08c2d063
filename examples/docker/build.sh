#!/usr/bin/env bash
# Builds the mhc_megatron image from the repository root, on the base image's digest (pulled
# first), and prints what to record with a run's results: that digest and the commit built.
#
#   examples/docker/build.sh [docker build options]
#   examples/docker/build.sh --build-arg USER_UID="$(id -u)" --build-arg USER_GID="$(id -g)"
#
# Environment: IMAGE (default mhc-megatron), TAG (default the commit's short hash, or "dev"
# outside a git checkout). The image is tagged IMAGE:TAG and IMAGE:latest.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
IMAGE="${IMAGE:-mhc-megatron}"
REVISION="$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
TAG="${TAG:-$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo dev)}"
# The Dockerfile's default base, unless a --build-arg BASE_IMAGE=... overrides it.
BASE="$(sed -n 's/^ARG BASE_IMAGE=//p' "$ROOT/Dockerfile")"
for arg in "$@"; do
  case "$arg" in *BASE_IMAGE=*) BASE="${arg#*BASE_IMAGE=}" ;; esac
done

# The tag names a release; the digest names the exact image, so build on the digest.
docker pull "$BASE"
BASE_DIGEST="$(docker image inspect --format '{{index .RepoDigests 0}}' "$BASE")"

docker build \
  --label org.opencontainers.image.revision="$REVISION" \
  --label org.opencontainers.image.base.name="$BASE" \
  --label org.opencontainers.image.base.digest="${BASE_DIGEST#*@}" \
  -t "$IMAGE:$TAG" -t "$IMAGE:latest" "$@" --build-arg BASE_IMAGE="$BASE_DIGEST" "$ROOT"

echo "built $IMAGE:$TAG from commit $REVISION on $BASE_DIGEST ($BASE)"
