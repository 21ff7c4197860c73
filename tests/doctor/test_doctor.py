"""`spotstart doctor` finds each trap on a case the test builds: real mounts (tmpfs, a
loop-mounted ext4 file, a squashfuse FUSE mount), a musl loader in a fake root, recorded
mountinfo and sysfs trees shaped like each cloud's disks; the link measured against the
emulated cloud; exit 16 on a blocking problem."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spotstart.doctor import diagnose, probes
from spotstart.emulate.link import LinkConfig
from spotstart.emulate.storage import StorageEmulator
from spotstart.errors import NodeUnfit
from tests.conftest import BUCKET, run_cli

MOUNTINFO = """\
22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p1 rw
25 22 0:21 / /dev/shm rw,nosuid,nodev shared:4 - tmpfs tmpfs rw,size=65536k
31 22 259:2 / /mnt/disks/ssd0 rw,relatime shared:9 - ext4 /dev/nvme1n1 rw
40 22 0:45 / /mnt/gcs\\040models rw,nosuid,nodev,relatime shared:20 - fuse.gcsfuse models rw
41 22 0:46 / /mnt/nfs rw,relatime - nfs4 10.0.0.2:/export rw
"""


def _doctor_json(*args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, object]]:
    res = run_cli(["doctor", "--json", "--seconds", "1", *args], env=env, timeout_s=120)
    assert res.stdout, res.stderr
    return res.code, json.loads(res.stdout)


def _check(doc: dict[str, object], name: str) -> dict[str, str]:
    checks = doc["checks"]
    assert isinstance(checks, list)
    return next(c for c in checks if c["name"] == name)


def test_mountinfo_is_parsed_to_the_mount_holding_a_path() -> None:
    mounts = probes.parse_mountinfo(MOUNTINFO)
    assert [m.mount_point for m in mounts][3] == "/mnt/gcs models"  # \040 unescaped
    where = {
        "/mnt/disks/ssd0/llama": ("/mnt/disks/ssd0", "ext4"),
        "/mnt/gcs models/llama": ("/mnt/gcs models", "fuse.gcsfuse"),
        "/dev/shm/x": ("/dev/shm", "tmpfs"),
        "/mnt/nfs": ("/mnt/nfs", "nfs4"),
        "/mnt/disks": ("/", "ext4"),
    }
    for path, (mp, fs) in where.items():
        m = probes.mount_of(Path(path), mounts)
        assert m is not None and (m.mount_point, m.fs_type) == (mp, fs), path


@pytest.mark.parametrize(
    ("model", "kind"),
    [
        ("nvme_card-pd", "network-disk"),  # GCE persistent disk on NVMe
        ("Amazon Elastic Block Store", "network-disk"),
        ("Amazon EC2 NVMe Instance Storage", "local-nvme"),
        ("Microsoft NVMe Direct Disk", "local-nvme"),
        ("Virtual Disk", "network-disk"),  # Azure managed disk
        ("nvme_card", "local-nvme"),  # GCE local SSD
    ],
)
def test_each_clouds_disk_model_is_told_apart(tmp_path: Path, model: str, kind: str) -> None:
    sys_root = tmp_path / "sys"
    disk = sys_root / "devices/pci0000:00/0000:00:04.0/nvme/nvme0/nvme0n1"
    (disk / "device").mkdir(parents=True)
    (disk / "device/model").write_text(model + "\n")
    part = disk / "nvme0n1p1"
    part.mkdir()
    (part / "partition").write_text("1\n")
    (sys_root / "dev/block").mkdir(parents=True)
    (sys_root / "dev/block/259:1").symlink_to(part)
    (mount,) = [m for m in probes.parse_mountinfo(MOUNTINFO) if m.mount_point == "/"]
    device = probes.device_of(mount, sys_root)
    assert device is not None and device.name == "nvme0n1"  # the partition's disk
    assert probes.classify(mount, device)[0] == kind


def test_a_musl_loader_in_the_root_is_the_alpine_trap(tmp_path: Path) -> None:
    root = tmp_path / "alpine"
    (root / "lib").mkdir(parents=True)
    (root / "lib/ld-musl-x86_64.so.1").write_bytes(b"\x7fELF")
    (root / "etc").mkdir()
    (root / "etc/alpine-release").write_text("3.20.0\n")
    code, doc = _doctor_json("--root", str(root))
    libc = _check(doc, "libc")
    assert libc["verdict"] == "warn" and "one process" in libc["detail"]
    assert "spotstart fetch" in libc["fix"]
    assert code == 0  # a warning, not blocking
    glibc = tmp_path / "debian"
    (glibc / "lib64").mkdir(parents=True)
    (glibc / "lib64/ld-linux-x86-64.so.2").write_bytes(b"\x7fELF")
    assert _check(_doctor_json("--root", str(glibc))[1], "libc")["verdict"] == "ok"


def test_dest_on_tmpfs_is_ram() -> None:
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm here")
    code, doc = _doctor_json("--dest", "/dev/shm/llama")
    fs = _check(doc, "dest filesystem")
    assert fs["verdict"] == "warn" and "tmpfs (RAM)" in fs["detail"], fs
    assert code == 0


@contextlib.contextmanager
def _mounted(cmd: list[str], where: Path) -> Iterator[None]:
    where.mkdir()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=60)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here ({' '.join(cmd[:2])}): {done.stderr.strip()[:200]}")
    try:
        yield
    finally:
        for _ in range(50):
            undo = subprocess.run(["umount", str(where)], capture_output=True, check=False)
            if undo.returncode == 0:
                break
            time.sleep(0.1)


def test_a_loop_mounted_ext4_file_too_small_for_the_model_is_blocking(tmp_path: Path) -> None:
    if os.geteuid() != 0 or not shutil.which("mkfs.ext4"):
        pytest.skip("needs root and mkfs.ext4 to loop-mount a filesystem")
    image = tmp_path / "disk.img"
    with image.open("wb") as fh:
        fh.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, timeout=60)
    mnt = tmp_path / "mnt"
    with _mounted(["mount", "-o", "loop", str(image), str(mnt)], mnt):
        code, doc = _doctor_json("--dest", str(mnt / "llama"), "--model-bytes", "1GB")
        fs = _check(doc, "dest filesystem")
        assert "loop device" in fs["detail"] and fs["verdict"] == "warn", fs
        space = _check(doc, "free space")
        assert space["verdict"] == "fail" and "for a 1.07 GB model" in space["detail"]  # GiB
        assert code == NodeUnfit.exit_code
        # small enough: not blocking, and the disk is measured (fdatasync'd writes)
        code, doc = _doctor_json("--dest", str(mnt / "llama"), "--model-bytes", "10MB")
        assert code == 0 and float(doc["measured"]["disk_write_mb_s"]) > 0  # type: ignore[index]
        assert not any(p.name.startswith("doctor-") for p in (mnt / "llama").rglob("*"))


def test_a_fuse_mount_is_named_and_a_read_only_one_blocks(tmp_path: Path) -> None:
    if not (shutil.which("squashfuse") and shutil.which("mksquashfs")):
        pytest.skip("squashfuse/mksquashfs not installed (tests/setup.sh installs them)")
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    image = tmp_path / "w.sqfs"
    subprocess.run(["mksquashfs", str(src), str(image), "-quiet", "-noappend"], check=True)
    mnt = tmp_path / "fuse"
    with _mounted(["squashfuse", str(image), str(mnt)], mnt):
        code, doc = _doctor_json("--dest", str(mnt))
        fs = _check(doc, "dest filesystem")
        assert fs["verdict"] == "warn" and "FUSE (fuse.squashfuse" in fs["detail"], fs
        assert "local NVMe" in fs["fix"]
        assert _check(doc, "disk write")["verdict"] == "fail"  # read-only: nothing lands
        assert code == NodeUnfit.exit_code


def test_the_link_is_measured_and_the_cold_start_predicted(
    clean_cloud: StorageEmulator, gcs_env: dict[str, str], tmp_path: Path
) -> None:
    clean_cloud.seed_gcs(BUCKET, {"doc/model.bin": os.urandom(24 << 20)})
    clean_cloud.set_link(LinkConfig(per_conn_bytes_per_s=20e6, first_byte_latency_s=0.005))
    try:
        code, doc = _doctor_json(
            "--source",
            f"gs://{BUCKET}/doc/",
            "--dest",
            str(tmp_path / "w"),
            "--model-bytes",
            "2GB",
            env=gcs_env,
        )
    finally:
        clean_cloud.set_link(LinkConfig(per_conn_bytes_per_s=None, first_byte_latency_s=0.0))
    assert code == 0, doc
    measured = doc["measured"]
    assert isinstance(measured, dict)
    one, eight = measured["link_one_stream_mb_s"], measured["link_eight_streams_mb_s"]
    # the emulated link caps each connection at 20 MB/s: eight streams must beat one
    assert 0 < one <= 21 and eight > 1.5 * one
    prediction = doc["prediction"]
    assert isinstance(prediction, dict)
    assert prediction["fetch_bottleneck"] in ("link", "disk", "cpu")
    rate = min(
        v
        for k, v in {
            "link": eight,
            "disk": measured["disk_write_mb_s"],
            "cpu": measured["usable_cpus"] * 1000,
        }.items()
    )
    assert prediction["fetch_s"] == pytest.approx((2 << 30) / (rate * 1e6), rel=0.02)
    assert _check(doc, "cpu for fetch")["verdict"] in ("ok", "warn")
    res = run_cli(["doctor", "--source", f"gs://{BUCKET}/doc/", "--seconds", "1"], env=gcs_env)
    assert res.code == 0 and "spotstart doctor" in res.stdout and "link to the source" in res.stdout


# Planted links: tmp_path is no sticky world-writable directory, so fs.protected_symlinks
# (which guards only those) does not hide a followed link, as root (CI) or not.


def test_doctor_never_writes_through_a_link_planted_at_its_scratch_name(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    (dest / ".spotstart").mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    os.symlink(victim, dest / ".spotstart" / f"doctor-{os.getpid()}.tmp")
    report = asyncio.run(diagnose(dest))
    assert victim.read_bytes() == b"precious"
    assert report.measured["disk_write_mb_s"] > 0
    assert os.listdir(dest / ".spotstart") == []  # the link removed, the scratch file too


@pytest.mark.parametrize("plant", ["link", "shared", "stranger"])
def test_doctor_refuses_a_state_dir_that_is_a_link_or_that_others_can_write(
    tmp_path: Path, plant: str
) -> None:
    dest, outside = tmp_path / "dest", tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    if plant == "link":
        os.symlink(outside, dest / ".spotstart")
        why = "a symlink in the path"
    elif plant == "shared":
        (dest / ".spotstart").mkdir()
        os.chmod(dest / ".spotstart", 0o777)
        why = "writable by group or others"
    else:
        if os.geteuid() != 0:
            pytest.skip("chown to another user needs root")
        (dest / ".spotstart").mkdir()
        os.chown(dest / ".spotstart", 65534, 65534)
        why = "owned by uid 65534"
    code, doc = _doctor_json("--dest", str(dest))
    check = _check(doc, "disk write")
    assert check["verdict"] == "fail" and why in check["detail"], check
    assert code == NodeUnfit.exit_code
    assert os.listdir(outside) == []
    assert [p.name for p in (dest / ".spotstart").iterdir()] == []
