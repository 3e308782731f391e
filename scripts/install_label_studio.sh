#!/usr/bin/env bash
# Install Label Studio 1.23.2 into its own virtual environment, .cache/ls-venv (it pins its own
# Django stack, so it must not share the backend's venv). Idempotent: a stamp file records a
# finished install; a missing or broken venv is rebuilt. Fast when already done.
# Used by the end-to-end tests, the e2e benchmark and `make demo`.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION="1.23.2"
# Label Studio 1.23.2 asks for sentry-sdk>=2.16 with no upper bound, and sentry-sdk 3.0 dropped
# the `send_default_pii` option it passes at start: with 3.x it exits before serving anything
# ("TypeError: Unknown option 'send_default_pii'"). Keep the 2.x line it was released with.
CONSTRAINT="sentry-sdk<3"
# The installed Label Studio is usable: the right version, and a sentry-sdk it can start with.
CHECK="import label_studio, sentry_sdk, sys; sys.exit(label_studio.__version__ != '$VERSION' or int(sentry_sdk.VERSION.split('.')[0]) >= 3)"
VENV=".cache/ls-venv"
STAMP="$VENV/.installed-label-studio"
PYTHON="${PYTHON:-python3}"

# Done already: stamp present and the package imports at the right version. (Do not run
# `label-studio --version` here: it asks PyPI for updates and hangs without internet.)
if [ -f "$STAMP" ] && [ -x "$VENV/bin/label-studio" ] \
  && timeout 120 "$VENV/bin/python" -c "$CHECK" 2>/dev/null; then
  exit 0
fi

# A venv with the right version but no stamp (installed by hand or by an older script): adopt it.
if [ -x "$VENV/bin/label-studio" ] \
  && timeout 120 "$VENV/bin/python" -c "$CHECK" 2>/dev/null; then
  touch "$STAMP"
  exit 0
fi

echo "Installing label-studio==$VERSION into $VENV (a few minutes, once)..." >&2
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import sys" 2>/dev/null; then
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "label-studio==$VERSION" "$CONSTRAINT"
"$VENV/bin/python" -c "$CHECK" || { echo "Label Studio $VERSION or $CONSTRAINT did not install in $VENV" >&2; exit 1; }
touch "$STAMP"
echo "Label Studio $VERSION installed in $VENV" >&2
