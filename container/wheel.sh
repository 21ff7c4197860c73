#!/usr/bin/env bash
# container/wheel.sh REPO DIR: spotstart's wheel for the image, built from REPO's files that
# git tracks (as they are in the working tree) and nothing else: no untracked file (a local
# config, a secret beside the examples), no stale module an earlier build left in build/lib,
# no egg-info. The build backend is container/build-requirements.lock's setuptools, checked
# by hash (--require-hashes), never one pip's build isolation takes from the index.
# Not for: the wheel we publish (tests/test_wheel.py builds that with `python -m build`).
set -euo pipefail
if [ $# -ne 2 ]; then
  echo "usage: container/wheel.sh REPO DIR" >&2
  exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
repo=$1
out=$2
work=$(mktemp -d "${TMPDIR:-/tmp}/spotstart-wheel.XXXXXX")
trap 'rm -rf -- "$work"' EXIT
if ! git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  echo "container/wheel.sh: $repo is no git checkout: the files of the package are unknown" >&2
  exit 2
fi
# The package's files only (pyproject.toml, its readme, src/); a file deleted in the working
# tree is skipped (--ignore-failed-read), not taken from the index.
mkdir "$work/src"
git -C "$repo" ls-files -z -- pyproject.toml README.md src |
  tar -C "$repo" --null --ignore-failed-read -T - -cf - 2>/dev/null |
  tar -C "$work/src" -xf -
python3 -m pip install -q --no-deps --require-hashes --only-binary=:all: \
  --target "$work/backend" -r "$here/build-requirements.lock"
mkdir -p "$out"
PYTHONPATH="$work/backend" python3 -m pip wheel -q --no-deps --no-index --no-build-isolation \
  -w "$out" "$work/src"
