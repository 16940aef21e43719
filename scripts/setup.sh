#!/usr/bin/env bash
# Set-up: the Debian data packages (Fashion-MNIST; the Python 3.11 documentation sources, our
# English text corpus), then a virtualenv with this package. `bash scripts/setup.sh test` adds
# the test dependencies. Runs apt-get as root, or through sudo.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(dataset-fashion-mnist python3.11-doc)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
[ -x .venv/bin/python ] || python3.11 -m venv .venv
.venv/bin/pip install -q -e ".${extra}"
