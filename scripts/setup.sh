#!/usr/bin/env bash
# Installs what building Switchyard needs on a fresh Debian machine, once:
# cmake (pingora's build), nginx for the load bench's reference proxy and wrk
# for its closed-loop part.
# protoc needs nothing: the build uses a vendored one.
set -euo pipefail
need=()
command -v cmake >/dev/null || need+=(cmake)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v wrk >/dev/null || need+=(wrk)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "setup: cargo is required (rustup)"; exit 1; }
