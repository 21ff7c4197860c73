#!/usr/bin/env bash
# container/lock.sh: rewrite container/requirements.lock, the exact wheels (name, version,
# sha256) the spotstart image installs besides spotstart itself: `spotstart[k8s]`'s runtime
# dependencies as pip resolves them today for the image's Python (CPython 3.11, glibc 2.36,
# x86_64), and the pip that installs them; and container/build-requirements.lock, the
# setuptools that builds spotstart's wheel. Run it after a change to pyproject.toml's
# dependencies (the image test's `pip check` fails until then), then rerun the image test with
# SPOTSTART_UPDATE_PREFETCH=1 to refresh container/prefetch/.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
. "$here/platform.sh"
work=$(mktemp -d)
trap 'rm -rf -- "$work"' EXIT
"$here/wheel.sh" "$repo" "$work/app"
python3 -m pip download -q "${PIP_TARGET[@]}" -d "$work/deps" "$(ls "$work"/app/*.whl)[k8s]" pip
{
  echo "# container/lock.sh writes this file: the wheels container/build.sh installs, pinned"
  echo "# with their sha256 (pip --require-hashes). Not spotstart itself: built from the checkout."
  for whl in "$work"/deps/*.whl; do
    name=$(basename "$whl" | cut -d- -f1)
    version=$(basename "$whl" | cut -d- -f2)
    [ "$name" = spotstart ] && continue
    echo "$name==$version --hash=sha256:$(sha256sum "$whl" | cut -d' ' -f1)"
  done
} >"$here/requirements.lock.part"
mv "$here/requirements.lock.part" "$here/requirements.lock"
echo "container/requirements.lock: $(grep -c '==' "$here/requirements.lock") wheels" >&2
# and what builds spotstart's own wheel (container/wheel.sh): setuptools, by hash
python3 -m pip download -q --no-deps --only-binary=:all: -d "$work/backend" setuptools
{
  sed -n '1,/^# setuptools/{/^#/p}' "$here/build-requirements.lock"
  for whl in "$work"/backend/setuptools-*.whl; do
    version=$(basename "$whl" | cut -d- -f2)
    echo "setuptools==$version --hash=sha256:$(sha256sum "$whl" | cut -d' ' -f1)"
  done
} >"$here/build-requirements.lock.part"
mv "$here/build-requirements.lock.part" "$here/build-requirements.lock"
