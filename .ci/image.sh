#!/usr/bin/env bash
# Build the saeforge image on this machine and run the deployment test against it (`make test-image`).
#
# Docker Hub and PyTorch's wheel index are out of reach here, so the base is a Debian bookworm made with
# debootstrap (cached in /var/cache/saeforge between runs) and imported with `docker import`, and the CPU torch
# wheel comes from the build context (pip finds it on this machine's disk). Starts dockerd when no engine
# answers (no bridge, no iptables: every container uses the host's network, on loopback) and stops it, and
# everything else it started, on exit.
#
#   bash .ci/image.sh            # install, start, build, test
#   SAEFORGE_IMAGE_NO_CACHE=1    # rebuild every layer (to measure a build from scratch)
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${SAEFORGE_TEST_IMAGE:-saeforge:test}
BASE=saeforge-base:bookworm
CACHE=/var/cache/saeforge
TORCH=torch==2.13.0
LOG=$CACHE/dockerd.log
mkdir -p "$CACHE"

if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io debootstrap >/dev/null
fi

started=""
cleanup() {
  if [ -n "$started" ]; then
    kill "$started" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 "$started" 2>/dev/null || break; sleep 1; done
  fi
}
trap cleanup EXIT
if ! docker info >/dev/null 2>&1; then
  dockerd --bridge=none --iptables=false --ip-masq=false --storage-driver=overlay2 >>"$LOG" 2>&1 &
  started=$!
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { tail -20 "$LOG"; echo "dockerd did not start (log: $LOG)" >&2; exit 1; }
fi

# The base: Debian bookworm with its python3.11 (venv and headers too), made once per machine.
if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  if [ ! -s "$CACHE/bookworm.tar" ]; then
    rm -rf "$CACHE/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-dev bookworm "$CACHE/rootfs" \
      http://deb.debian.org/debian >"$CACHE/debootstrap.log" 2>&1 \
      || { tail -20 "$CACHE/debootstrap.log"; exit 1; }
    rm -rf "$CACHE/rootfs"/var/cache/apt/archives/*.deb "$CACHE/rootfs"/var/lib/apt/lists/*
    tar -C "$CACHE/rootfs" -cf "$CACHE/bookworm.tar.part" . && mv "$CACHE/bookworm.tar.part" "$CACHE/bookworm.tar"
    rm -rf "$CACHE/rootfs"
  fi
  docker import --change 'CMD ["/bin/bash"]' "$CACHE/bookworm.tar" "$BASE" >/dev/null
fi

# The build context's extras (docker-context/README.md): the torch wheel from this disk, and this machine's
# extra CA certificates (its TLS-inspecting proxy to PyPI); both are left out of git.
find docker-context/wheels docker-context/ca-certificates -type f ! -name .keep -delete
pip download --quiet "$TORCH" --no-deps -d docker-context/wheels
wheel=$(basename "$(ls docker-context/wheels/torch-*.whl)")
if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
  cp /usr/local/share/ca-certificates/*.crt docker-context/ca-certificates/
fi

no_cache=()
[ -n "${SAEFORGE_IMAGE_NO_CACHE:-}" ] && no_cache=(--no-cache)
previous=$(docker image inspect "$IMAGE" --format '{{.Id}}' 2>/dev/null || true)
start=$(date +%s)
DOCKER_BUILDKIT=0 docker build --network host "${no_cache[@]}" -t "$IMAGE" \
  --build-arg BASE_IMAGE="$BASE" --build-arg TORCH_WHEEL="$wheel" . >"$CACHE/build.log" 2>&1 \
  || { tail -40 "$CACHE/build.log"; echo "docker build failed (log: $CACHE/build.log)" >&2; exit 1; }
build_s=$(( $(date +%s) - start ))
size=$(docker image inspect "$IMAGE" --format '{{.Size}}')
# The image this build replaced (3 GB): gone, unless this build is the same image.
if [ -n "$previous" ] && [ "$previous" != "$(docker image inspect "$IMAGE" --format '{{.Id}}')" ]; then
  docker image rm "$previous" >/dev/null 2>&1 || true
fi
echo "image $IMAGE: built in ${build_s} s, $(( size / 1000000 )) MB"

start=$(date +%s)
SAEFORGE_TEST_IMAGE="$IMAGE" .venv/bin/pytest -q -p no:cacheprovider --durations=5 -m image tests/deploy
echo "deployment test: $(( $(date +%s) - start )) s"
