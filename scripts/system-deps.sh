#!/usr/bin/env bash
# Installs the Debian packages the test-suite drives for real, only when missing.
set -euo pipefail
need=()
# (filled as issues add real third-party servers/clients: redis-server, chromium, prometheus)
for pkg in "$@"; do :; done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then echo "missing packages: ${need[*]} (run as root)"; exit 1; fi
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
fi
