#!/usr/bin/env bash
# The dashboard's browser test drives Debian's chromium (Playwright downloads no browser offline).
# `make test` runs this first: it installs chromium with apt-get where it is missing and we are root,
# and otherwise says why the browser test will be skipped. It never fails the test run.
set -u
CHROMIUM=/usr/bin/chromium
if [ -x "$CHROMIUM" ]; then
  exit 0
fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null; then
  echo "note: $CHROMIUM is missing and cannot be installed here (needs root and apt-get):" \
       "the dashboard's browser test will be skipped; install Debian's chromium to run it" >&2
  exit 0
fi
echo "installing Debian's chromium for the dashboard's browser test (apt-get)" >&2
apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
  || echo "note: apt-get could not install chromium: the browser test will be skipped" >&2
exit 0
