#!/usr/bin/env bash
# Install Debian's chromium for the browser test (Playwright drives /usr/bin/chromium; no browser
# download from Playwright's CDN is needed). Idempotent and quiet: does nothing when present.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "chromium is missing and this is not root: run 'sudo apt-get install chromium' (the browser test is skipped without it)" >&2
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "chromium is missing and there is no apt-get here: install a Chromium at /usr/bin/chromium (the browser test is skipped without it)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends chromium >/dev/null
echo "chromium installed at /usr/bin/chromium" >&2
