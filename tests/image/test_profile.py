"""`spotstart image profile` on a real Python server started from an image root: a Python
(Debian's, with its libraries and standard library) packed into an OCI image with umoci,
unpacked by the command itself, traced with strace (and with the audit hook), stopped once
its readiness URL answers. Each prefetch list is parsed back against its documented shape."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from spotstart.emulate.registry import DockerRegistry
from spotstart.emulate.servers import free_port
from tests.conftest import error_line, run_cli
from tests.image import builder, pyroot

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An OCI layout (tag `server`) whose one layer is the Python root, packed by umoci."""
    d = tmp_path_factory.mktemp("server-image")
    layout = d / "oci"
    builder.OciBuilder(layout, "server")
    bundle = d / "bundle"
    builder.run("umoci", "unpack", "--rootless", "--image", f"{layout}:server", bundle)
    pyroot.build(bundle / "rootfs")
    builder.run(
        "umoci",
        "repack",
        "--history.created_by",
        "COPY python and /app",
        "--image",
        f"{layout}:server",
        bundle,
    )
    return layout


def _profile(args: list[str], out: Path, port: int) -> tuple[int, str, dict]:
    result = run_cli(
        [
            "image",
            "profile",
            *args,
            "--ready-url",
            f"http://127.0.0.1:{port}/",
            "-o",
            str(out),
            "--json",
            "--",
            "/usr/bin/python3",
            "/app/server.py",
            str(port),
        ],
        timeout_s=200,
    )
    return result.code, result.stderr, json.loads(result.stdout) if result.code == 0 else {}


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is installed by tests/setup.sh")
def test_strace_profile_of_a_python_server_from_its_image(
    server_image: Path, tmp_path: Path
) -> None:
    out = tmp_path / "profile"
    code, stderr, summary = _profile(["--image", f"oci:{server_image}:server"], out, free_port())
    assert code == 0, stderr
    assert summary["tracer"] == "strace"
    doc = json.loads((out / "profile.json").read_text())
    paths = [f["path"] for f in doc["files"]]
    # exec first, then the ELF interpreter the kernel mapped, then what the loader opened
    python = Path(pyroot.host_python()).name
    assert paths[0] == f"/usr/bin/{python}"
    assert paths[1].startswith(("/lib64/ld-linux", "/lib/ld-linux", "/usr/lib64/ld-linux"))
    assert any("/libc.so" in p for p in paths[:8])
    assert "/app/server.py" in paths
    assert any(p.endswith("/http/server.py") for p in paths)
    assert paths.index("/app/server.py") < paths.index("/models/model.safetensors")
    weights = [f for f in doc["files"] if f["kind"] == "weights"]
    assert weights == [
        {"path": "/models/model.safetensors", "bytes": pyroot.WEIGHTS_BYTES, "kind": "weights"}
    ]
    code_paths = [f["path"] for f in doc["files"] if f["kind"] == "code"]
    # eStargz --estargz-record-in: JSON lines, each an object with "path" (a tar entry name)
    records = [json.loads(line) for line in (out / "estargz-record.jsonl").read_text().splitlines()]
    assert all(set(r) == {"path"} and not r["path"].startswith("/") for r in records)
    assert ["/" + r["path"] for r in records] == code_paths
    # SOCI --prefetch-files-json: one JSON array of absolute paths
    soci = json.loads((out / "soci-prefetch.json").read_text())
    assert isinstance(soci, list) and soci == code_paths
    # Nydus prefetch patterns: absolute paths, one a line
    nydus = (out / "nydus-prefetch.txt").read_text().splitlines()
    assert nydus == code_paths and all(p.startswith("/") for p in nydus)
    assert "/models/model.safetensors" not in nydus
    assert 0 < summary["share_of_image"] < 1
    # and the audit reads the profile: the share of the image a start reads, lazily pulled
    audited = run_cli(
        [
            "image",
            "audit",
            f"oci:{server_image}:server",
            "--profile",
            str(out / "profile.json"),
            "--json",
        ]
    )
    assert audited.code == 0, audited.stderr
    report = json.loads(audited.stdout)
    # the checks against the image: every path is in it; SOCI's zTOC minimum as the layer is
    assert not any("not files of the image" in w for w in summary["warnings"])
    small = report["layers"][-1]["bytes_compressed"] < 10 << 20
    assert any("zTOC minimum" in w for w in summary["warnings"]) == small
    # the start reads files in another order than the layer stores them: SOCI loses it
    assert any("out of first-read order" in w for w in summary["warnings"])
    startup = report["startup"]
    assert startup["files"] == len(paths) and startup["files_missing"] == 0
    assert startup["bytes_read"] == sum(f["bytes"] for f in doc["files"])


def test_audit_hook_profile_when_strace_is_not_used(server_image: Path, tmp_path: Path) -> None:
    d = tmp_path / "unpacked"
    builder.run("umoci", "unpack", "--rootless", "--image", f"{server_image}:server", d)
    root = d / "rootfs"
    out = tmp_path / "profile"
    code, stderr, summary = _profile(
        ["--rootfs", str(root), "--tracer", "audit-hook"], out, free_port()
    )
    assert code == 0, stderr
    assert summary["tracer"] == "audit-hook"
    nydus = (out / "nydus-prefetch.txt").read_text().splitlines()
    assert "/app/server.py" in nydus and any(p.endswith("/http/server.py") for p in nydus)
    assert summary["weight_files"] == 1
    assert not [p for p in root.iterdir() if p.name.startswith(".spotstart-hook")]  # cleaned up


def test_a_server_that_exits_before_ready_is_exit_15(tmp_path: Path) -> None:
    root = tmp_path / "root"
    pyroot.build(root)
    result = run_cli(
        [
            "image",
            "profile",
            "--rootfs",
            str(root),
            "--ready-url",
            "http://127.0.0.1:9/",
            "-o",
            str(tmp_path / "p"),
            "--",
            "/usr/bin/python3",
            "-c",
            "raise SystemExit(3)",
        ],
    )
    assert result.code == 15, result.stderr
    assert "exited with 3" in error_line(result.stderr)


def test_profile_needs_a_readiness_signal(tmp_path: Path) -> None:
    result = run_cli(["image", "profile", "--rootfs", str(tmp_path), "--", "true"])
    assert result.code == 2
    assert "--ready-url" in error_line(result.stderr)


def test_profile_unpacks_an_image_from_a_plain_http_registry(
    server_image: Path, registry: DockerRegistry, tmp_path: Path
) -> None:
    builder.skopeo(
        f"oci:{server_image}:server",
        f"docker://{registry.address}/team/server:v1",
        "--dest-tls-verify=false",
    )
    out = tmp_path / "profile"
    code, stderr, summary = _profile(
        ["--image", f"{registry.address}/team/server:v1"], out, free_port()
    )
    assert code == 0, stderr
    nydus = (out / "nydus-prefetch.txt").read_text().splitlines()
    assert "/app/server.py" in nydus
    assert not any("not files of the image" in w for w in summary["warnings"])
