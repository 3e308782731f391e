#!/usr/bin/env bash
# Install Debian's docker-compose for tests/test_deploy_files.py, which checks docker-compose.yml
# with `docker-compose config` (no Docker daemon needed). Idempotent and quiet: does nothing when
# docker-compose (or the `docker compose` plugin) is already there.
set -euo pipefail

if command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "docker-compose is missing and this is not root: run 'sudo apt-get install docker-compose' (the compose check is skipped without it)" >&2
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "docker-compose is missing and there is no apt-get here: install docker-compose (the compose check is skipped without it)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends docker-compose >/dev/null
echo "docker-compose installed at $(command -v docker-compose)" >&2
