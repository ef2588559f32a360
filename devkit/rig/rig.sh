#!/usr/bin/env bash
# The molecule rig on a machine with no registry access (see README, "Stand-ins"):
#   daemon-up    start a Docker daemon if none answers (privileged containers through runc-capfilter)
#   daemon-down  stop the daemon this script started (and only that one)
#   base-image   Debian bookworm rootfs via debootstrap -> `docker import` (cached as a tarball)
#   images       build the gateway images and the engine stand-ins, save each as an archive for the hosts
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cache="${VILMS_RIG_CACHE:-$root/.cache/rig}"
state=/var/run/vilms-rig
base_image=vilms-rig/debian:bookworm-3  # bump when the include list changes
mkdir -p "$cache" "$state"

daemon_up() {
  if docker info >/dev/null 2>&1; then echo "rig: a Docker daemon is already running"; return; fi
  install -m 0755 "$here/runc-capfilter" /usr/local/bin/vilms-runc-capfilter
  echo "rig: starting dockerd (data in $cache/docker)"
  dockerd --data-root "$cache/docker" -p "$state/dockerd.pid" -H unix:///var/run/docker.sock \
    --add-runtime vilms-capfilter=/usr/local/bin/vilms-runc-capfilter --default-runtime vilms-capfilter \
    >"$state/dockerd.log" 2>&1 &
  echo $! >"$state/started-by-rig"
  for _ in $(seq 1 100); do docker info >/dev/null 2>&1 && return; sleep 0.2; done
  echo "rig: dockerd did not start:"; tail -20 "$state/dockerd.log"; exit 1
}

daemon_down() {
  [ -f "$state/started-by-rig" ] || { echo "rig: no daemon started by the rig"; return; }
  pid=$(cat "$state/started-by-rig"); rm -f "$state/started-by-rig"
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  echo "rig: dockerd stopped"
}

base_image() {
  if docker image inspect "$base_image" >/dev/null 2>&1; then return; fi
  tarball="$cache/debian-bookworm-rootfs-3.tar"
  if [ ! -s "$tarball" ]; then
    echo "rig: debootstrap bookworm (about 80 s, once)"
    rootfs=$(mktemp -d)
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,procps,iproute2,libgomp1,rsync \
      bookworm "$rootfs" http://deb.debian.org/debian >"$cache/debootstrap.log" 2>&1
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    rm -rf "$rootfs"
  fi
  docker import "$tarball" "$base_image" >/dev/null
  echo "rig: imported $base_image"
}

build_and_save() {  # image dockerfile archive [build args...]
  local image=$1 dockerfile=$2 archive=$3; shift 3
  docker build -q -f "$dockerfile" --build-arg BASE_IMAGE="$base_image" "$@" -t "$image" "$root" >/dev/null
  id=$(docker image inspect -f '{{.Id}}' "$image")
  if [ ! -s "$archive" ] || [ "$(cat "$archive.id" 2>/dev/null)" != "$id" ]; then
    docker save -o "$archive.tmp" "$image" && mv "$archive.tmp" "$archive" && echo "$id" >"$archive.id"
  fi
  echo "rig: $image -> $archive"
}

images() {
  base_image
  mkdir -p "$cache/images" "$root/gateway/wheels" "$here/context/wheels"
  venv_py="$root/.venv/bin/python"
  # Builds run offline (--no-index): every wheel is fetched here first, by the controller's pip. That is how
  # air-gapped fleets build too, and it keeps the CPU torch build (no multi-GB CUDA download).
  deps=$("$venv_py" -c 'import tomllib; p=tomllib.load(open("pyproject.toml","rb"))["project"]; print(" ".join(p["dependencies"]+p["optional-dependencies"]["embeddings"]))')
  # shellcheck disable=SC2086
  "$venv_py" -m pip download -q --only-binary=:all: -d "$root/gateway/wheels" "torch==2.13.0" $deps hatchling
  # llama.cpp: reuse the wheel pip built for the venv (no second 8 min compile).
  llama_whl=$(find "${PIP_CACHE_DIR:-$HOME/.cache/pip}" -name 'llama_cpp_python-0.3.36-*.whl' 2>/dev/null | head -n1)
  [ -n "$llama_whl" ] || { "$venv_py" -m pip wheel -q --no-deps -w "$cache/wheels" llama-cpp-python==0.3.36;
                           llama_whl=$(ls "$cache"/wheels/llama_cpp_python-*.whl | head -n1); }
  cp -u "$llama_whl" "$here/context/wheels/"
  "$venv_py" -m pip download -q --only-binary=:all: -d "$here/context/wheels" numpy diskcache jinja2 typing-extensions \
    fastapi uvicorn sse-starlette starlette-context pydantic-settings orjson
  "$venv_py" -m devkit.tiny_model "$here/context/tiny.gguf" >/dev/null
  # The Jetson scenarios' Ollama models as a local Ollama store on the controller (vilms_stack_ollama_local_store).
  PYTHONPATH="$root/gateway:$root" "$venv_py" -m devkit.ollama_models "$cache/ollama-store" --gguf "$here/context/tiny.gguf" \
    qwen2.5:3b qwen2.5vl:3b
  build_and_save vilms/gateway:rig "$root/gateway/Dockerfile" "$cache/images/gateway.tar" --build-arg PIP_ARGS=--no-index
  build_and_save vilms/gateway:rig-emb "$root/gateway/Dockerfile" "$cache/images/gateway-emb.tar" \
    --build-arg PIP_ARGS=--no-index --build-arg VARIANT=embeddings
  # The gateway for Jetsons (linux/arm64), built without emulation by gateway/cross_image.py (make image-arm64).
  "$venv_py" "$root/gateway/cross_image.py" --tag vilms/gateway:rig-arm64 --out "$cache/images/gateway-arm64.tar" \
    --cache "$cache/cross" >/dev/null
  echo "rig: vilms/gateway:rig-arm64 -> $cache/images/gateway-arm64.tar"
  # One stand-in image; also tagged as the L4T-matched tag jetson_runtime picks for the rig's fake L4T 36.4.
  build_and_save vilms-rig/engines:standin "$here/standin.Dockerfile" "$cache/images/engines.tar"
  docker tag vilms-rig/engines:standin vilms-rig/engines:r36.4.0
  docker save -o "$cache/images/engines.tar" vilms-rig/engines:standin vilms-rig/engines:r36.4.0
}

case "${1:-}" in
  daemon-up) daemon_up ;;
  daemon-down) daemon_down ;;
  base-image) base_image ;;
  images) images ;;
  *) echo "usage: $0 daemon-up|daemon-down|base-image|images"; exit 2 ;;
esac
