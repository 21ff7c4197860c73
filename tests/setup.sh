#!/usr/bin/env bash
# Everything the test run needs, from nothing (README command 2; .ci/run runs it too):
# nginx from Debian (the http/https server of the tests), npm s3rver (a third S3), and a
# virtual environment with the package, its dev/crosscheck extras and the CPU torch wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null
  else
    echo "tests/setup.sh: nginx is missing; install it: sudo apt-get install nginx-light" >&2
    exit 1
  fi
fi
npm ci --prefix tests/node --no-audit --no-fund --silent
python3 -m venv .venv
. .venv/bin/activate
pip install -q torch==2.13.0 -e '.[dev,torch]'
