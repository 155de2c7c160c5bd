#!/usr/bin/env bash
# Install the Debian packages the test suite needs, only when missing. Quiet on success.
set -euo pipefail

need=()
command -v thrift >/dev/null 2>&1 || need+=(thrift-compiler)
# tracing: the trace viewer's browser tests drive Debian's Chromium through Playwright
[ -x /usr/bin/chromium ] || need+=(chromium)

[ ${#need[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO=sudo; else
    echo "missing system packages: ${need[*]} (run as root or install them: apt-get install ${need[*]})" >&2
    exit 1
  fi
else
  SUDO=
fi
echo "installing system packages: ${need[*]} ..."
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
