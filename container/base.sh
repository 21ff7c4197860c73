#!/usr/bin/env bash
# container/base.sh OUT.tar: the base root of the spotstart image (container/build.sh caches
# it by this file's hash): Debian bookworm minbase from the Debian mirror by debootstrap, with
# Debian's python3 and the CA certificates (https to gs/s3/az), stripped of what a fetch init
# container, a peer sidecar and a controller never read, and the non-root user 65532.
# Not for: anything pip installs (build.sh does, in layers of their own). Needs root.
set -euo pipefail
out=$1
suite=${SPOTSTART_IMAGE_SUITE:-bookworm}
mirror=${SPOTSTART_IMAGE_MIRROR:-http://deb.debian.org/debian}
epoch=${SOURCE_DATE_EPOCH:-0}
root=$(mktemp -d "${TMPDIR:-/tmp}/spotstart-base.XXXXXX")
trap 'rm -rf -- "$root"' EXIT

keyring=${SPOTSTART_IMAGE_KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}

# --variant=minbase: the Essential packages and apt, nothing of "important" (no init system,
# no editor, no networking tools). The Release file's signature is checked with Debian's
# archive keyring, and --force-check-gpg makes a host without it an error: otherwise
# debootstrap only warns ("Cannot check Release signature") and takes whatever the mirror
# (plain http) serves.
debootstrap --force-check-gpg --keyring="$keyring" --variant=minbase \
  --include=python3,ca-certificates "$suite" "$root" "$mirror" >&2

# Users who extend the image (FROM this, apt-get install ...) get no docs either.
cat >"$root/etc/dpkg/dpkg.cfg.d/spotstart-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
EOF
# The same, now: docs, man pages, translations (the licences stay: copyright files), apt's
# lists and the .debs debootstrap leaves in apt's cache, logs, the -old copies dpkg and
# debconf keep.
find "$root/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete
find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$root"/usr/share/{man,info,lintian,linda}/* "$root/var/lib/apt/lists/"*
find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
rm -rf "$root/var/cache/apt/"* "$root/var/cache/debconf/"*-old "$root/var/lib/dpkg/"*-old
find "$root/var/log" -type f -delete
rm -f "$root/etc/machine-id" "$root/var/lib/dbus/machine-id" "$root/etc/hostname"
# Nothing of the build host or its network: debootstrap copies the host's /etc/resolv.conf
# (its nameservers and search domains; a runtime mounts the pod's own over it) and writes
# the mirror it used into apt's sources (SPOTSTART_IMAGE_MIRROR may be an internal mirror,
# user:password@ in its URL). An image that is extended (apt-get install) uses Debian's.
: >"$root/etc/resolv.conf"
echo "deb http://deb.debian.org/debian $suite main" >"$root/etc/apt/sources.list"
# The device nodes debootstrap made: a runtime mounts /dev of its own, and a node in a layer
# is no file a snapshotter can prefetch (nor one a rootless unpack can make).
find "$root/dev" -mindepth 1 -delete
# The Debian stdlib's bytecode stays: compiled by its postinst (py3compile), read at every
# start, and a non-root user could not write it. Debian's own tools' (py3compile,
# py3versions) is never read at run time.
find "$root/usr/share/python3" -name __pycache__ -type d -prune -exec rm -rf {} +
# No setuid or setgid programs (su, passwd, mount, chsh...): a process of the image's user,
# or code a dependency runs, must not become root through one.
find "$root" -xdev -type f -perm /6000 -exec chmod ug-s {} +

# The user the image runs as (65532, as distroless' "nonroot"): no password, no login shell.
echo 'spotstart:x:65532:65532:spotstart:/home/spotstart:/usr/sbin/nologin' >>"$root/etc/passwd"
echo 'spotstart:x:65532:' >>"$root/etc/group"
echo 'spotstart:!*:19000::::::' >>"$root/etc/shadow"
install -d -m 0755 -o 65532 -g 65532 "$root/home/spotstart"

# One tar, its members in name order with one time, so the same packages make the same bytes.
# A part file of a name of its own (mktemp: O_EXCL, mode 0600), never a fixed "$out.part" that
# a symlink planted beside it would send root's tar elsewhere through.
mkdir -p "$(dirname "$out")"
part=$(mktemp "$out.XXXXXX")
trap 'rm -rf -- "$root" "$part"' EXIT
tar --sort=name --mtime="@$epoch" --clamp-mtime --numeric-owner --xattrs --xattrs-include='*' \
  -C "$root" -cf "$part" .
mv -f -- "$part" "$out"
