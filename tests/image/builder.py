"""Images built for the tests with the real tools: layers written as tar files member by
member (so whiteouts, opaque dirs, hardlinks and duplicates are exactly what a test says), added
with `umoci raw add-layer`, converted with `skopeo copy` to docker-archive, oci-archive, zstd
and a registry."""

from __future__ import annotations

import io
import random
import subprocess
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Member:
    name: str
    kind: str = "file"  # file, dir, symlink, hardlink
    size: int = 0
    target: str = ""
    seed: int = 0


def file(name: str, size: int, seed: int = 0) -> Member:
    return Member(name, "file", size, seed=seed or zlib.crc32(name.encode()))


def dir_(name: str) -> Member:
    return Member(name, "dir")


def symlink(name: str, target: str) -> Member:
    return Member(name, "symlink", target=target)


def hardlink(name: str, target: str) -> Member:
    return Member(name, "hardlink", target=target)


def whiteout(path: str) -> Member:
    head, _, base = path.rstrip("/").rpartition("/")
    return file(f"{head + '/' if head else ''}.wh.{base}", 0)


def opaque(directory: str) -> Member:
    return file(f"{directory.rstrip('/')}/.wh..wh..opq", 0)


def data_for(m: Member) -> bytes:
    # Half random, half repeated: compresses like real files, deterministic per member.
    rnd = random.Random(m.seed)
    half = m.size // 2
    return rnd.randbytes(half) + bytes(m.size - half)


def write_layer(path: Path, members: list[Member], fmt: int = tarfile.PAX_FORMAT) -> None:
    with tarfile.open(path, "w", format=fmt) as tf:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.mtime = 1_700_000_000
            if m.kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(info)
            elif m.kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, m.target
                tf.addfile(info)
            elif m.kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, m.target
                tf.addfile(info)
            else:
                info.size, info.mode = m.size, 0o644
                tf.addfile(info, io.BytesIO(data_for(m)))


def run(*cmd: str | Path) -> str:
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed: {out.stderr.strip()}")
    return out.stdout


class OciBuilder:
    """An OCI layout at ``root`` with one image ``tag``, grown a layer at a time."""

    def __init__(self, root: Path, tag: str = "latest", *, new: bool = True) -> None:
        self.root, self.tag = root, tag
        self._n = 0
        if not (root / "oci-layout").exists():
            run("umoci", "init", "--layout", root)
        if new:
            run("umoci", "new", "--image", f"{root}:{tag}")

    @property
    def ref(self) -> str:
        return f"{self.root}:{self.tag}"

    def layer(self, members: list[Member], created_by: str, fmt: int = tarfile.PAX_FORMAT) -> None:
        self._n += 1
        tar = self.root.parent / f"{self.root.name}-{self.tag}-layer{self._n}.tar"
        assert not tar.exists()
        write_layer(tar, members, fmt)
        run(
            "umoci",
            "raw",
            "add-layer",
            "--image",
            self.ref,
            "--history.created_by",
            created_by,
            tar,
        )
        tar.unlink()


def skopeo(src: str, dest: str, *extra: str) -> None:
    run("skopeo", "copy", "--quiet", "--insecure-policy", *extra, src, dest)
