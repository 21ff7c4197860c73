"""What this node is, read from the files the kernel and the distribution keep: pure functions
of a root directory (``/`` on a real run, a fake tree in tests) and of text read from it.

- libc: musl (Alpine) or glibc, from the dynamic loaders present.
- the mount holding a path: ``/proc/self/mountinfo`` (proc(5)), longest mount point that
  contains the path, with its filesystem type and source device.
- the device under it: ``/sys/class/block/<dev>`` (partitions resolved to their disk), its
  model string naming local NVMe or a network disk the way each cloud does
  (GCE ``nvme_card-pd``/``PersistentDisk``, AWS ``Amazon Elastic Block Store`` vs ``Amazon EC2
  NVMe Instance Storage``, Azure ``Microsoft NVMe Direct Disk`` vs ``Virtual Disk``).
- the CPUs this process may use: affinity, and a cgroup v2 ``cpu.max`` quota.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path


def libc(root: Path) -> str:
    """ "musl", "glibc" or "unknown": by the dynamic loader the system ships."""
    for d in ("lib", "usr/lib", "lib64"):
        base = root / d
        try:
            names = os.listdir(base)
        except OSError:
            continue
        if any(n.startswith("ld-musl-") for n in names):
            return "musl"
    if (root / "etc" / "alpine-release").exists():
        return "musl"
    for d in ("lib64", "lib", "usr/lib", "lib/x86_64-linux-gnu", "lib/aarch64-linux-gnu"):
        try:
            names = os.listdir(root / d)
        except OSError:
            continue
        if any(n.startswith("ld-linux") or n.startswith("libc.so.6") for n in names):
            return "glibc"
    return "unknown"


@dataclass(frozen=True)
class Mount:
    mount_point: str
    fs_type: str
    source: str
    major_minor: str


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040 ...)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """Mounts from ``/proc/self/mountinfo`` lines: ``id parent major:minor root mount-point
    options [optional...] - fstype source super-options``."""
    out = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        f, r = left.split(), right.split()
        if len(f) < 5 or len(r) < 2:
            continue
        out.append(Mount(_unescape(f[4]), r[0], _unescape(r[1]), f[2]))
    return out


def mount_of(path: Path, mounts: list[Mount]) -> Mount | None:
    """The mount holding ``path`` (resolved): the last-mounted longest prefix."""
    p = str(path)
    best: Mount | None = None
    for m in mounts:
        mp = m.mount_point.rstrip("/") or "/"
        inside = p == mp or p.startswith(mp + "/") or mp == "/"
        if inside and (best is None or len(mp) >= len(best.mount_point.rstrip("/") or "/")):
            best = m
    return best


@dataclass(frozen=True)
class Device:
    name: str  # the disk, partitions resolved: nvme0n1, vda, loop3
    model: str
    rotational: bool


def device_of(mount: Mount, sys_root: Path) -> Device | None:
    """The block device under ``mount`` from sysfs (``/sys/dev/block/MAJ:MIN``)."""
    link = sys_root / "dev" / "block" / mount.major_minor
    try:
        target = Path(os.path.realpath(link))
    except OSError:
        return None
    if not target.exists():
        return None
    disk = target.parent if (target / "partition").exists() else target
    model = ""
    for rel in ("device/model", "device/vendor"):
        try:
            text = (disk / rel).read_text().strip()
        except OSError:
            continue
        if text and not text.startswith("0x"):  # virtio gives a PCI vendor id: no name
            model = text
            break
    try:
        rotational = (disk / "queue" / "rotational").read_text().strip() == "1"
    except OSError:
        rotational = False
    return Device(disk.name, model, rotational)


NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "9p", "ceph", "glusterfs", "lustre", "virtiofs"}
RAM_FS = {"tmpfs", "ramfs"}


def classify(mount: Mount | None, device: Device | None) -> tuple[str, str]:
    """(kind, words): kind one of local-nvme, network-disk, virtual-disk, loop, ram, fuse,
    network-fs, rotational, local, unknown."""
    if mount is None:
        return "unknown", "no mount found for it"
    fs = mount.fs_type
    if fs in RAM_FS:
        return "ram", f"{fs} (RAM)"
    if fs == "fuse" or fs.startswith("fuse.") or fs == "fuseblk":
        return "fuse", f"FUSE ({fs}, {mount.source})"
    if fs.split(".")[0] in NETWORK_FS:
        return "network-fs", f"network filesystem ({fs}, {mount.source})"
    if device is None:
        return "unknown", f"{fs} on {mount.source}"
    model = device.model.lower()
    where = f"{fs} on {device.name}" + (f" ({device.model})" if device.model else "")
    if device.name.startswith("loop"):
        return "loop", f"{where}: a loop device (a file on another filesystem)"
    if any(k in model for k in ("persistentdisk", "nvme_card-pd", "elastic block store")):
        return "network-disk", where
    if "virtual disk" in model:  # Azure managed disks (Msft Virtual Disk)
        return "network-disk", where
    if device.name.startswith("nvme") or "instance storage" in model or "direct disk" in model:
        return "local-nvme", where
    if device.name.startswith(("vd", "xvd")):
        return "virtual-disk", f"{where}: a virtio disk (network-backed on most clouds)"
    if device.rotational:
        return "rotational", where
    return "local", where


def usable_cpus(root: Path) -> float:
    """CPUs this process may use: its affinity, capped by a cgroup v2 ``cpu.max`` quota."""
    try:
        cpus = float(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        cpus = float(os.cpu_count() or 1)
    try:
        quota, period = (root / "sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, int(quota) / int(period))
    except (OSError, ValueError):
        pass
    return cpus
