#!/usr/bin/env bash
# container/build.sh DIR [TAG]: the spotstart image (the fetch init container, the peer
# sidecar, the k8s controller), built without a Docker daemon (buildah, chroot isolation, vfs
# storage of its own under a temporary directory), written as an OCI image layout at DIR
# (tag TAG, default the package's version). Three layers, each changing at its own pace:
#   0 Debian bookworm minbase + python3 + CA certificates (container/base.sh; the tar is
#     cached by base.sh's hash in ~/.cache/spotstart/, or $SPOTSTART_IMAGE_CACHE)
#   1 a venv in /opt/spotstart with spotstart[k8s]'s dependencies (container/requirements.lock,
#     pinned by hash)
#   2 spotstart, the wheel built from this checkout's tracked files (container/wheel.sh,
#     setuptools pinned by hash in container/build-requirements.lock)
# Wheels come from the index pip on this host uses (pip's own proxy and CA settings); inside
# the image nothing reaches a network. Needs root, buildah, debootstrap, python3 with pip.
# File times: each layer's are the last commit of that layer's inputs (layer 2 and the image's
# creation time: the checkout's last commit), or SOURCE_DATE_EPOCH for all where it is set:
# the same inputs give the same layers (layer 1 measured byte for byte across two builds; the
# base root is the cached tar, so the same on one machine, not across machines).
set -euo pipefail
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  echo "usage: container/build.sh DIR [TAG]" >&2
  exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
out=$1
. "$here/platform.sh"
for tool in buildah debootstrap; do
  command -v "$tool" >/dev/null || { echo "build.sh: needs $tool (apt-get install $tool)" >&2; exit 2; }
done
export STORAGE_DRIVER=vfs BUILDAH_ISOLATION=chroot
SOURCE_DATE_EPOCH_FIXED=${SOURCE_DATE_EPOCH:-}
# Each layer's file times (and so its digest) come from the last commit of its own inputs:
# a commit that changes only spotstart leaves layers 0 and 1 byte for byte as they were, and
# a node that holds them pulls only layer 2. (One SOURCE_DATE_EPOCH of HEAD for all three
# gave every commit three new layers of identical content.) A SOURCE_DATE_EPOCH set by the
# caller is every layer's.
epoch_of() { git -C "$repo" log -1 --format=%ct -- "$@" 2>/dev/null | grep . || echo 0; }
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(epoch_of .)}
epoch_base=${SOURCE_DATE_EPOCH_FIXED:-$(epoch_of container/base.sh)}
epoch_deps=${SOURCE_DATE_EPOCH_FIXED:-$(epoch_of container/base.sh container/build.sh \
  container/platform.sh container/requirements.lock)}
export PIP_DISABLE_PIP_VERSION_CHECK=1
version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$repo/src/spotstart/__init__.py")
tag=${2:-$version}
revision=$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)
created=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)
work=$(mktemp -d "${TMPDIR:-/tmp}/spotstart-build.XXXXXX")
bh() { buildah --root "$work/storage" --runroot "$work/run" --storage-driver vfs "$@"; }
cleanup() {
  bh rm --all >/dev/null 2>&1 || true
  rm -rf -- "$work"
}
trap cleanup EXIT
step() { echo "build.sh: $(date -u +%T) $*" >&2; }

key=$({ cat "$here/base.sh"; echo "${SPOTSTART_IMAGE_SUITE:-bookworm}"; } | sha256sum | cut -c1-12)
cache=${SPOTSTART_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/spotstart}
# The cached root becomes every file of the image's base, and base.sh writes it as root: a
# cache another user can write (a shared SPOTSTART_IMAGE_CACHE, /tmp, a sudo that kept a
# user's HOME) could swap it between our check and buildah's read, or hold a symlink that
# sends root's write elsewhere. The cache and every directory above it: owned by root or
# us, and no group/other write but on a sticky directory above it (as /tmp).
private_dir() {
  local d p owner mode
  (umask 077 && mkdir -p -- "$1") || return 1
  d=$(realpath -e -- "$1") || return 1
  p=$d
  while :; do
    read -r owner mode < <(stat -c '%u %a' -- "$p") || return 1
    if [ "$owner" != 0 ] && [ "$owner" != "$(id -u)" ]; then return 1; fi
    if (((8#$mode & 8#022) != 0)); then
      [ "$p" != "$d" ] && (((8#$mode & 8#1000) != 0)) || return 1
    fi
    [ "$p" = / ] && return 0
    p=$(dirname -- "$p")
  done
}
if ! private_dir "$cache"; then
  echo "build.sh: the cache $cache (or a directory above it) is owned or writable by another" \
    "user: set SPOTSTART_IMAGE_CACHE to a directory only $(id -un) can write" >&2
  exit 2
fi
base="$cache/image-base-$key.tar"
# The cached root becomes the image: one that another user could have written is made anew.
if [ -f "$base" ] && { [ "$(stat -c %u "$base")" != "$(id -u)" ] || [ -n "$(find "$base" -perm /022)" ]; }; then
  echo "build.sh: $base is not ours alone (owner or group/other write): making it anew" >&2
  rm -f -- "$base"
fi
if [ ! -f "$base" ]; then
  step "making the base root with debootstrap (once per container/base.sh: $base)"
  "$here/base.sh" "$base"
fi

step "wheels: spotstart from $repo, the rest from container/requirements.lock"
"$here/wheel.sh" "$repo" "$work/app"
python3 -m pip download -q --no-deps --require-hashes "${PIP_TARGET[@]}" \
  -r "$here/requirements.lock" -d "$work/wheels"
mkdir "$work/pip"
mv "$work"/wheels/pip-*.whl "$work/pip/"

site=/opt/spotstart/lib/python3.11/site-packages
# pip runs from its wheel (no pip in the image); --no-compile, then bytecode compiled with
# unchecked hashes: no mtime in it (reproducible), no source hash checked at import (the
# image is immutable), and written now because uid 65532 cannot write it at run time.
pip_install="/opt/spotstart/bin/python /pip/\$(cd /pip && ls pip-*.whl)/pip install -q \
--no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check"
compile="/opt/spotstart/bin/python -m compileall -q -j0 --invalidation-mode unchecked-hash"
# Nothing a server imports: tests and docs of the dependencies (the audit's
# tests-docs-in-site-packages rule), and what a venv keeps for interactive shells.
prune="find $site -mindepth 2 -type d \\( -name tests -o -name docs -o -name doc \\) -prune \
-exec rm -rf {} + && rm -f /opt/spotstart/bin/Activate.ps1 /opt/spotstart/bin/activate*"

step "layer 0: the base root"
ctr=$(bh from --quiet scratch)
bh add --quiet "$ctr" "$base" /
bh config --created-by "container/base.sh: debootstrap $key (Debian bookworm minbase, python3)" "$ctr"
bh commit --quiet --format oci --timestamp "$epoch_base" --rm "$ctr" spotstart-base >/dev/null

step "layer 1: the venv and the locked dependencies"
ctr=$(bh from --quiet spotstart-base)
bh run --volume "$work/wheels:/wheels:ro" --volume "$work/pip:/pip:ro" "$ctr" -- sh -ec "
  python3 -m venv --without-pip /opt/spotstart
  $pip_install /wheels/*.whl
  $prune
  $compile $site"
bh config --created-by "container/build.sh: venv /opt/spotstart, requirements.lock" "$ctr"
bh commit --quiet --format oci --timestamp "$epoch_deps" --rm "$ctr" spotstart-deps >/dev/null

step "layer 2: spotstart $version"
ctr=$(bh from --quiet spotstart-deps)
bh run --volume "$work/app:/app:ro" --volume "$work/pip:/pip:ro" "$ctr" -- sh -ec "
  $pip_install /app/spotstart-*.whl
  $compile $site/spotstart
  /opt/spotstart/bin/python /pip/\$(cd /pip && ls pip-*.whl)/pip check -q
  /opt/spotstart/bin/spotstart --version"
bh config \
  --created-by "container/build.sh: spotstart $version ($revision)" \
  --user 65532:65532 \
  --workingdir /home/spotstart \
  --env PATH=/opt/spotstart/bin:/usr/local/bin:/usr/bin:/bin \
  --env HOME=/home/spotstart \
  --env PYTHONDONTWRITEBYTECODE=1 \
  --env PYTHONUNBUFFERED=1 \
  --entrypoint '["/opt/spotstart/bin/spotstart"]' \
  --cmd '["--help"]' \
  --label org.opencontainers.image.title=spotstart \
  --label "org.opencontainers.image.description=spotstart: fetch init container, peer sidecar and k8s controller" \
  --label "org.opencontainers.image.version=$version" \
  --label "org.opencontainers.image.revision=$revision" \
  --label "org.opencontainers.image.created=$created" \
  --label org.opencontainers.image.licenses=Apache-2.0 \
  --label "org.opencontainers.image.base.name=debian:bookworm (debootstrap --variant=minbase)" \
  "$ctr"
bh commit --quiet --format oci --timestamp "$SOURCE_DATE_EPOCH" --rm "$ctr" spotstart >/dev/null

step "writing oci:$out:$tag"
mkdir -p "$out"
bh push --quiet spotstart "oci:$out:$tag"
step "done"
