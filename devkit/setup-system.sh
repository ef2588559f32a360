#!/usr/bin/env bash
# System pieces the test suite and the local rig need on a Debian 12 machine (run as root):
#   - a docker CLI + engine (Debian's docker.io) and the compose v2 plugin (Debian trixie's single .deb:
#     bookworm has no compose v2; trixie is used for that one download only, never added to the system)
#   - debootstrap (base images for the rig, since no registry is reachable), wrk (benchmarks), rsync (weights)
#   - docker-registry (Debian's registry binary: the simulated fleet's site registry)
# Idempotent: a second run installs nothing.
set -euo pipefail

need=()
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v rsync >/dev/null 2>&1 || need+=(rsync)  # ships model weights to hosts (vilms_stack weights)
command -v docker-registry >/dev/null 2>&1 || need+=(docker-registry)  # the simulated fleet's site registry
# arm64 under emulation: the Jetson gateway image (gateway/cross_image.py) answers /health_check in a test
[ -e /usr/libexec/qemu-binfmt/aarch64-binfmt-P ] || need+=(qemu-user-static binfmt-support)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup-system: installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # The fleet runs the registry binary in a box on its own network; the package's system service (all
  # interfaces, port 5000) is not wanted.
  if [[ " ${need[*]} " == *" docker-registry "* ]] && [ -d /run/systemd/system ]; then
    systemctl disable --now docker-registry >/dev/null 2>&1 || true
  fi
fi

# Register the aarch64 interpreter when the kernel lets us (root, binfmt_misc); a machine that cannot still builds
# the arm64 image (no step runs arm64 code) and its test only skips running it.
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  [ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null || true
  update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || echo "setup-system: qemu-aarch64 not registered (arm64 images will not run here)"
fi

plugin_dir="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins"
if ! docker compose version >/dev/null 2>&1; then
  echo "setup-system: fetching the compose v2 plugin from Debian trixie"
  work=$(mktemp -d)
  mkdir -p "$work/lists/partial" "$work/archives/partial" "$plugin_dir"
  echo "deb http://deb.debian.org/debian trixie main" >"$work/sources.list"
  opts=(-o "Dir::Etc::sourcelist=$work/sources.list" -o "Dir::Etc::sourceparts=-" -o "Dir::State::Lists=$work/lists"
        -o "Dir::Cache::archives=$work/archives" -o "APT::Get::List-Cleanup=0")
  apt-get "${opts[@]}" update -qq 2>/dev/null
  (cd "$work" && apt-get "${opts[@]}" download docker-compose >/dev/null 2>&1)
  dpkg-deb -x "$work"/docker-compose_*.deb "$work/x"
  install -m 0755 "$(find "$work/x" -type f -path "*cli-plugins/docker-compose" | head -n1)" "$plugin_dir/docker-compose"
  rm -rf "$work"
fi
docker compose version
