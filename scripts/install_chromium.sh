#!/usr/bin/env bash
# Install Debian's chromium for the headless-browser check of `pcim render`'s report.html
# (tests/test_render.py; without chromium that test is skipped, with the reason).
# Idempotent: does nothing when a chromium is already on PATH. Needs apt-get and root (or password-less
# sudo); without them it says so and exits 0. An apt failure exits non-zero, so CI does not quietly skip.
# apt runs under `flock /tmp/apt.lock`, so concurrent installers on one machine wait for each other.
set -euo pipefail

for name in chromium chromium-browser; do
  if command -v "$name" >/dev/null 2>&1; then
    echo "install_chromium: $("$name" --version 2>/dev/null || echo "$name") already installed"
    exit 0
  fi
done

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_chromium: no apt-get here; install chromium with your package manager (the report test is skipped)" >&2
  exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
  else
    echo "install_chromium: not root and no password-less sudo; run 'sudo apt-get install chromium' (the report test is skipped)" >&2
    exit 0
  fi
fi

LOCK=()
if command -v flock >/dev/null 2>&1; then
  LOCK=(flock /tmp/apt.lock)
fi

export DEBIAN_FRONTEND=noninteractive
"${LOCK[@]}" "${SUDO[@]}" apt-get update -qq
"${LOCK[@]}" "${SUDO[@]}" apt-get install -y -qq --no-install-recommends chromium
echo "install_chromium: $(chromium --version)"
