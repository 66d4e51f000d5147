#!/usr/bin/env bash
# Provide Debian's chromium for the report's headless-browser test (tests/test_bench.py looks for
# `chromium` or `chromium-browser` on PATH, scripts/check_report.sh runs it). Never fails the CI:
# a problem is reported on stderr, the script exits non-zero, and that test skips with its reason.
set -u
log() { echo "chromium: $*" >&2; }

if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  log "chromium is not installed and cannot be installed here (not root or no apt-get)"; exit 1
fi
log "installing chromium (Debian package)"
(timeout 300 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq chromium) \
  >/dev/null 2>&1 || { log "could not install chromium (apt-get failed)"; exit 1; }
command -v chromium >/dev/null 2>&1 || { log "the chromium package installed no chromium on PATH"; exit 1; }
log "$(chromium --version 2>/dev/null | head -1)"
