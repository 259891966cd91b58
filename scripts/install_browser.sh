#!/usr/bin/env bash
# Install what tests/console's browser test needs: Debian's chromium (Playwright's own browser download is not
# available on these machines; the Python playwright package from the test extra drives this one), then check
# that it starts headless.
# Idempotent: when /usr/bin/chromium is there, apt-get is not called.
# Usage: scripts/install_browser.sh
set -euo pipefail

CHROMIUM=/usr/bin/chromium

if [[ ! -x "$CHROMIUM" ]]; then
  if [[ "$(id -u)" -eq 0 ]]; then
    SUDO=()
  elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
  else
    echo "install_browser: $CHROMIUM is missing and this user can neither install packages nor sudo;" \
         "install Debian's chromium package (apt-get install chromium)" >&2
    exit 1
  fi
  "${SUDO[@]}" apt-get install -y chromium || {
    "${SUDO[@]}" apt-get update && "${SUDO[@]}" apt-get install -y chromium
  }
fi

# The network is closed here: without these flags Chromium waits on connections it will never get.
if ! out=$(timeout 60 "$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --dump-dom 'data:text/html,<p>veil-browser-ok</p>' 2>/dev/null) || [[ "$out" != *veil-browser-ok* ]]; then
  echo "install_browser: $CHROMIUM did not start headless" >&2
  exit 1
fi
echo "chromium ok: $("$CHROMIUM" --version 2>/dev/null | head -1)"
