#!/usr/bin/env bash
# The dashboard's browser test drives Debian's chromium (Playwright downloads no browser offline).
# `make test` (and so .ci/run) runs this first: it finds /usr/bin/chromium, or installs Debian's
# chromium with apt-get (as root, or through passwordless sudo), or fails saying how to get it, so a
# fresh machine never skips the browser test silently. TF_SKIP_BROWSER=1 lets the run go on without
# it (pytest then reports the browser test as skipped).
set -u
CHROMIUM=/usr/bin/chromium
HOW="install Debian's chromium (sudo apt-get install -y chromium), or run TF_SKIP_BROWSER=1 make test to skip the dashboard's browser test"
if [ -x "$CHROMIUM" ]; then
  exit 0
fi
if [ "${TF_SKIP_BROWSER:-0}" = "1" ]; then
  echo "note: $CHROMIUM is missing and TF_SKIP_BROWSER=1: the dashboard's browser test will be skipped" >&2
  exit 0
fi
if [ "$(id -u)" = "0" ]; then
  SUDO=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  SUDO=(sudo -n)
else
  echo "error: $CHROMIUM is missing and cannot be installed here (needs root or passwordless sudo): $HOW" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null; then
  echo "error: $CHROMIUM is missing and there is no apt-get to install it: $HOW" >&2
  exit 1
fi
echo "installing Debian's chromium for the dashboard's browser test (apt-get)" >&2
if ! { ${SUDO[@]+"${SUDO[@]}"} apt-get update -qq >/dev/null \
       && ${SUDO[@]+"${SUDO[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; then
  echo "error: apt-get could not install chromium (offline, or no such package here): $HOW" >&2
  exit 1
fi
if [ ! -x "$CHROMIUM" ]; then   # e.g. Ubuntu's chromium package is a snap wrapper without /usr/bin/chromium
  echo "error: apt-get installed chromium but $CHROMIUM is still missing: $HOW" >&2
  exit 1
fi
