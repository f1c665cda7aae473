#!/usr/bin/env bash
# Installs what the test-suite drives for real, only when missing: Debian packages first,
# then the Node packages of tests/js (`npm ci`, from tests/js/package-lock.json).
# Idempotent; when everything is present it does nothing and exits at once.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
# (extend as issues add real third-party servers/clients: redis-server, prometheus, ...)
command -v node >/dev/null 2>&1 || need+=(nodejs)  # tests/test_js_sdk.py: centrifuge-js
command -v npm >/dev/null 2>&1 || need+=(npm)
[ -x /usr/bin/chromium ] || need+=(chromium)       # headless browser for the same tests
command -v promtool >/dev/null 2>&1 || need+=(prometheus)  # tests/test_slo_rules.py: promtool

if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then echo "missing packages: ${need[*]} (run as root)" >&2; exit 1; fi
  echo "system-deps: installing ${need[*]}"
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
fi

# npm writes node_modules/.package-lock.json last: missing = never (fully) installed, older
# than package-lock.json = the lock changed since.
js=tests/js
if [ ! -f "$js/node_modules/.package-lock.json" ] || [ "$js/package-lock.json" -nt "$js/node_modules/.package-lock.json" ]; then
  echo "system-deps: npm ci in $js"
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --prefix "$js" --no-audit --no-fund --loglevel=error
fi
