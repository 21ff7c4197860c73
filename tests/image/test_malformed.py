"""Broken images and refusing registries: one clear line and a distinct exit code each
(12 invalid image, 13 unsupported, 3 not found, 4 access, 6 integrity), never a report."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from spotstart.emulate.registry import DockerRegistry
from tests.conftest import error_line, run_cli
from tests.image import builder
from tests.image.conftest import USERS, docker_config

pytestmark = pytest.mark.timeout(300)


def _copy_layout(images: dict[str, Path], tmp_path: Path) -> Path:
    dest = tmp_path / "layout"
    shutil.copytree(images["oci"], dest)
    return dest


def _manifest(layout: Path, tag: str = "v1") -> tuple[dict, dict, Path]:
    index = json.loads((layout / "index.json").read_text())
    desc = next(
        m
        for m in index["manifests"]
        if m["annotations"]["org.opencontainers.image.ref.name"] == tag
    )
    path = layout / "blobs" / "sha256" / desc["digest"].split(":")[1]
    return index, json.loads(path.read_text()), path


def _rewrite_manifest(layout: Path, manifest: dict, index: dict, tag: str = "v1") -> None:
    data = json.dumps(manifest).encode()
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    for m in index["manifests"]:
        if m["annotations"]["org.opencontainers.image.ref.name"] == tag:
            m["digest"], m["size"] = f"sha256:{digest}", len(data)
    (layout / "index.json").write_text(json.dumps(index))


def _layer_blob(layout: Path, manifest: dict, i: int) -> Path:
    return layout / "blobs" / "sha256" / manifest["layers"][i]["digest"].split(":")[1]


def test_truncated_archive_is_an_invalid_image(images: dict[str, Path], tmp_path: Path) -> None:
    cut = tmp_path / "cut.tar"
    data = images["docker"].read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    result = run_cli(["image", "audit", f"docker-archive:{cut}"])
    assert result.code == 12, result.stderr
    assert "truncated" in error_line(result.stderr) or "not a readable tar" in error_line(
        result.stderr
    )


def test_truncated_layer_blob_is_an_integrity_error(
    images: dict[str, Path], tmp_path: Path
) -> None:
    layout = _copy_layout(images, tmp_path)
    _, manifest, _ = _manifest(layout)
    blob = _layer_blob(layout, manifest, 0)
    blob.write_bytes(blob.read_bytes()[:-100])
    result = run_cli(["image", "audit", f"oci:{layout}:v1"])
    assert result.code == 6, result.stderr
    assert "the manifest says" in error_line(result.stderr)


def test_missing_blob_is_not_found(images: dict[str, Path], tmp_path: Path) -> None:
    layout = _copy_layout(images, tmp_path)
    _, manifest, _ = _manifest(layout)
    _layer_blob(layout, manifest, 2).unlink()
    result = run_cli(["image", "audit", f"oci:{layout}:v1"])
    assert result.code == 3, result.stderr
    assert "missing" in error_line(result.stderr)


def test_a_flipped_byte_fails_the_digest(images: dict[str, Path], tmp_path: Path) -> None:
    layout = _copy_layout(images, tmp_path)
    _, manifest, _ = _manifest(layout)
    blob = _layer_blob(layout, manifest, 1)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    result = run_cli(["image", "audit", f"oci:{layout}:v1", "--json"])
    assert result.code == 6, result.stderr
    assert "digest" in error_line(result.stderr)
    assert result.stdout == ""


def test_unknown_layer_media_type_is_unsupported(images: dict[str, Path], tmp_path: Path) -> None:
    layout = _copy_layout(images, tmp_path)
    index, manifest, _ = _manifest(layout)
    manifest["layers"][0]["mediaType"] = "application/vnd.example.encrypted.layer.v1+gzip+encrypted"
    _rewrite_manifest(layout, manifest, index)
    result = run_cli(["image", "audit", f"oci:{layout}:v1"])
    assert result.code == 13, result.stderr
    assert "media type" in error_line(result.stderr)


def test_an_index_without_the_platform_asked_for_is_not_found(
    images: dict[str, Path], tmp_path: Path
) -> None:
    layout = _copy_layout(images, tmp_path)
    index, _, _path = _manifest(layout)
    desc = next(
        m
        for m in index["manifests"]
        if m["annotations"]["org.opencontainers.image.ref.name"] == "v1"
    )
    inner = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                **{k: v for k, v in desc.items() if k != "annotations"},
                "platform": {"os": "linux", "architecture": "arm64"},
            }
        ],
    }
    data = json.dumps(inner).encode()
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    desc.update(
        mediaType="application/vnd.oci.image.index.v1+json",
        digest=f"sha256:{digest}",
        size=len(data),
    )
    (layout / "index.json").write_text(json.dumps(index))
    result = run_cli(["image", "audit", f"oci:{layout}:v1"])
    assert result.code == 3, result.stderr
    assert "linux/amd64" in error_line(result.stderr) and "linux/arm64" in error_line(result.stderr)
    picked = run_cli(["image", "audit", f"oci:{layout}:v1", "--platform", "linux/arm64", "--json"])
    assert picked.code == 0, picked.stderr


def test_a_layer_that_is_not_a_tar_is_an_invalid_image(
    images: dict[str, Path], tmp_path: Path
) -> None:
    layout = _copy_layout(images, tmp_path)
    index, manifest, _ = _manifest(layout)
    junk = b"this is not a tar archive at all\n" * 100
    digest = hashlib.sha256(junk).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(junk)
    manifest["layers"][0].update(digest=f"sha256:{digest}", size=len(junk))
    _rewrite_manifest(layout, manifest, index)
    result = run_cli(["image", "audit", f"oci:{layout}:v1"])
    assert result.code == 12, result.stderr


def test_a_digest_that_names_a_path_is_refused(images: dict[str, Path], tmp_path: Path) -> None:
    layout = _copy_layout(images, tmp_path)
    index, manifest, _ = _manifest(layout)
    manifest["layers"][0]["digest"] = "sha256:../../../../etc/passwd"
    _rewrite_manifest(layout, manifest, index)
    result = run_cli(["image", "audit", f"oci:{layout}:v1"])
    assert result.code == 12, result.stderr
    assert "not an OCI digest" in error_line(result.stderr)


def test_registry_404_is_not_found(registry: DockerRegistry) -> None:
    result = run_cli(["image", "audit", f"{registry.address}/team/missing:v9"])
    assert result.code == 3, result.stderr
    assert "MANIFEST_UNKNOWN" in error_line(result.stderr) or "NAME_UNKNOWN" in error_line(
        result.stderr
    )


@pytest.fixture(scope="module")
def pushed(
    token_registry: DockerRegistry,
    images: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> str:
    auth = docker_config(
        tmp_path_factory.mktemp("push-auth"), token_registry.address, "alice", USERS["alice"]
    )
    builder.skopeo(
        f"oci:{images['oci']}:v1",
        f"docker://{token_registry.address}/private/app:v1",
        "--dest-tls-verify=false",
        "--dest-authfile",
        str(auth / "config.json"),
    )
    return f"{token_registry.address}/private/app:v1"


def test_bearer_token_from_docker_config_reads_a_private_image(
    pushed: str, token_registry: DockerRegistry, tmp_path: Path
) -> None:
    conf = docker_config(tmp_path / "docker", token_registry.address, "alice", USERS["alice"])
    result = run_cli(
        ["image", "audit", f"docker://{pushed}", "--json"], env={"DOCKER_CONFIG": str(conf)}
    )
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["kind"] == "registry"
    assert token_registry.token is not None
    assert any(r["authorization"].startswith("Basic ") for r in token_registry.token.requests)


def test_registry_401_without_or_with_wrong_credentials(
    pushed: str, token_registry: DockerRegistry, tmp_path: Path
) -> None:
    none = run_cli(["image", "audit", pushed], env={"DOCKER_CONFIG": str(tmp_path / "empty")})
    assert none.code == 4, none.stderr
    assert "docker login" in error_line(none.stderr)
    conf = docker_config(tmp_path / "wrong", token_registry.address, "alice", "not-it")
    wrong = run_cli(["image", "audit", pushed], env={"DOCKER_CONFIG": str(conf)})
    assert wrong.code == 4, wrong.stderr
    assert "refused the credentials" in error_line(wrong.stderr)


def test_an_archive_member_linking_outside_the_archive_is_refused(tmp_path: Path) -> None:
    import io
    import tarfile

    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "0" * 64]},
        }
    ).encode()
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tf:
        for name, data in (
            (
                "manifest.json",
                json.dumps([{"Config": "c.json", "Layers": ["x/layer.tar"]}]).encode(),
            ),
            ("c.json", config),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("x/layer.tar")
        link.type, link.linkname = tarfile.SYMTYPE, "../../../../etc/passwd"
        tf.addfile(link)
    result = run_cli(["image", "audit", str(archive)])
    assert result.code == 12, result.stderr
    assert "links outside the archive" in error_line(result.stderr)


def test_a_registry_that_cuts_blob_bodies_is_retried_then_exit_7(
    images: dict[str, Path], tmp_path: Path
) -> None:
    """A registry (the distribution API's read side, served by a test server) whose blob
    answers promise more bytes than they send: each ranged read is retried, then the audit
    fails with one line and exit 7, never a traceback."""
    import socket
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    layout = images["oci"]
    index = json.loads((layout / "index.json").read_text())
    desc = next(
        m
        for m in index["manifests"]
        if m["annotations"]["org.opencontainers.image.ref.name"] == "v1"
    )
    blobs = layout / "blobs" / "sha256"
    manifest = (blobs / desc["digest"].split(":")[1]).read_bytes()
    config_digest = json.loads(manifest)["config"]["digest"]
    hits = {"blob": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parts = self.path.split("/")
            if "manifests" in parts:
                self._send(200, manifest, "application/vnd.oci.image.manifest.v1+json")
                return
            digest = parts[-1]
            data = (blobs / digest.split(":")[1]).read_bytes()
            if digest == config_digest:
                self._send(200, data, "application/octet-stream")
                return
            hits["blob"] += 1
            start, _, end = (
                self.headers.get("Range", "bytes=0-").removeprefix("bytes=").partition("-")
            )
            lo, hi = int(start), int(end or len(data) - 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {lo}-{hi}/{len(data)}")
            self.send_header("Content-Length", str(hi - lo + 1))
            self.end_headers()
            self.wfile.write(data[lo : lo + (hi - lo + 1) // 2])  # half, then hang up
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = run_cli(["image", "audit", f"127.0.0.1:{server.server_address[1]}/cut/app:v1"])
    finally:
        server.shutdown()
        server.server_close()
    assert result.code == 7, result.stderr
    assert "Traceback" not in result.stderr
    assert hits["blob"] >= 5  # the first ranged read, tried ATTEMPTS times


def test_a_symlink_loop_in_a_parent_path_is_a_reported_anomaly(tmp_path: Path) -> None:
    """A member under ``a/`` where a -> b -> a, one under a self-referencing link and one whose
    link target resolves past PATH_MAX: a runtime cannot extract them (ELOOP, ENAMETOOLONG);
    the audit reports them, counts their bytes as hidden, and goes on (exit 0, no
    traceback). The rest of the layer is read as usual."""
    b = builder.OciBuilder(tmp_path / "loop", "v1")
    deep = "/".join(["d" * 50] * 90)  # 4,589 bytes once resolved
    b.layer(
        [
            builder.symlink("a", "b"),
            builder.symlink("b", "a"),
            builder.file("a/x", 1000),
            builder.symlink("self", "self/self"),
            builder.file("self/y", 2000),
            builder.symlink("deep", deep[:4000]),
            builder.file("deep/" + "e" * 200 + "/z", 3000),
            builder.file("ok/keep", 4000),
        ],
        "RUN ln -s b a && ln -s a b",
    )
    result = run_cli(["image", "audit", f"oci:{b.ref}", "--json"])
    assert result.code == 0, result.stderr
    assert "Traceback" not in result.stderr
    report = json.loads(result.stdout)
    notes = "\n".join(report["notes"])
    assert "'a/x': its path loops through symlinks" in notes
    assert "'self/y': its path loops through symlinks" in notes
    assert "resolves to over 4096 bytes" in notes
    assert "3 member(s) no runtime can extract" in notes
    assert report["bytes_hidden"] == 1000 + 2000 + 3000
    assert report["layers"][0]["files"] == 4
    table = run_cli(["image", "audit", f"oci:{b.ref}"])
    assert table.code == 0 and "loops through symlinks" in table.stdout


def test_a_blob_that_is_a_device_or_a_fifo_is_refused_not_read_forever(
    images: dict[str, Path], tmp_path: Path
) -> None:
    """An OCI layout from elsewhere may hold links to /dev/zero or FIFOs: opening a FIFO
    blocks and a device never ends. Only regular files are read, each to its size."""
    import os

    layout = _copy_layout(images, tmp_path)
    _, manifest, _ = _manifest(layout)
    blob = _layer_blob(layout, manifest, 1)
    blob.unlink()
    blob.symlink_to("/dev/zero")
    result = run_cli(["image", "audit", f"oci:{layout}:v1"], timeout_s=60)
    assert result.code == 12, result.stderr
    assert "not a regular file" in error_line(result.stderr)

    fifo_layout = tmp_path / "fifo"
    shutil.copytree(images["oci"], fifo_layout)
    (fifo_layout / "index.json").unlink()
    os.mkfifo(fifo_layout / "index.json")
    result = run_cli(["image", "audit", f"oci:{fifo_layout}:v1"], timeout_s=60)
    assert result.code == 12, result.stderr
    assert "index.json: not a regular file" in error_line(result.stderr)


def test_a_blob_longer_than_its_descriptor_is_read_to_its_size_only(
    images: dict[str, Path], tmp_path: Path
) -> None:
    layout = _copy_layout(images, tmp_path)
    _, manifest, _ = _manifest(layout)
    blob = _layer_blob(layout, manifest, 0)
    with open(blob, "ab") as f:
        f.write(b"\0" * (8 << 20))
    result = run_cli(["image", "audit", f"oci:{layout}:v1"])
    assert result.code == 6, result.stderr
    assert "longer than the" in error_line(result.stderr)


def test_an_archive_with_a_huge_extended_header_is_refused_before_it_is_read(
    tmp_path: Path,
) -> None:
    """tarfile would read a pax header whole, whatever its size: over 1 MiB is refused."""
    import io
    import tarfile

    archive = tmp_path / "pax.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tf:
        data = b"[]"
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        info.pax_headers = {"comment": "x" * (2 << 20)}
        tf.addfile(info, io.BytesIO(data))
    result = run_cli(["image", "audit", f"docker-archive:{archive}"])
    assert result.code == 12, result.stderr
    assert "extended header of" in error_line(result.stderr)


def test_a_negative_pax_size_is_an_invalid_layer() -> None:
    """``size=-600`` would have the reader step backwards into what it already read."""
    import io
    import tarfile

    from spotstart.errors import InvalidImage
    from spotstart.image.tarscan import TarScanner

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("a")
        info.size, info.pax_headers = 3, {"size": "-600"}
        tf.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(InvalidImage, match="is not a byte count"):
        TarScanner().feed(buf.getvalue())


def _fuzz_settings():  # type: ignore[no-untyped-def]
    from hypothesis import HealthCheck, settings

    return settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_fuzz_any_bytes_through_the_tar_reader_and_tree_raise_only_invalid_image() -> None:
    """Any bytes, in any chunking, after a valid header or not: the layer reader raises
    InvalidImage or yields members, and the tree takes whatever it yields."""
    from hypothesis import given
    from hypothesis import strategies as st

    from spotstart.errors import InvalidImage
    from spotstart.image.tarscan import TarScanner
    from spotstart.image.tree import MergedTree

    header = _valid_header()

    @_fuzz_settings()
    @given(st.binary(max_size=3000), st.integers(1, 700), st.booleans())
    def check(data: bytes, chunk: int, prefixed: bool) -> None:
        stream = (header + data) if prefixed else data
        scanner, tree = TarScanner(), MergedTree()
        try:
            for i in range(0, len(stream), chunk):
                for entry in scanner.feed(stream[i : i + chunk]):
                    tree.add(0, entry)
            scanner.close()
        except InvalidImage:
            pass

    check()


def _valid_header() -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("x" * 120)  # a pax path record
        info.size = 5
        tf.addfile(info, io.BytesIO(b"hello"))
    return buf.getvalue()[:1536]


def test_fuzz_any_members_build_a_tree_without_raising() -> None:
    """Names and link targets from a small alphabet rich in "/", ".." and links to each
    other (loops, links through links, whiteouts of links): the tree never raises, and
    what it reports unreachable is counted."""
    from hypothesis import given
    from hypothesis import strategies as st

    from spotstart.image.tarscan import TarEntry
    from spotstart.image.tree import MergedTree

    seg = st.sampled_from(["a", "b", "..", ".", "", ".wh.a", ".wh..wh..opq", "c"])
    path = st.lists(seg, min_size=1, max_size=6).map("/".join)
    entry = st.builds(
        TarEntry,
        path,
        st.sampled_from(["file", "dir", "symlink", "hardlink", "other"]),
        st.integers(0, 100),
        path,
    )

    @_fuzz_settings()
    @given(st.lists(st.tuples(st.integers(0, 2), entry), max_size=30))
    def check(members: list[tuple[int, TarEntry]]) -> None:
        tree = MergedTree()
        for layer, e in sorted(members, key=lambda m: m[0]):
            tree.add(layer, e)
        for p, _ in tree.walk():
            tree.lookup(p)
        assert all(w.size >= 0 for w in tree.wasted)

    check()


def test_text_from_the_image_never_drives_the_terminal(tmp_path: Path) -> None:
    """A layer's history and its member names are the image author's: an ESC sequence or
    rich markup in them is printed as "?" and as written, not interpreted."""
    b = builder.OciBuilder(tmp_path / "esc", "v1")
    b.layer(
        [builder.file("root/.cache/pip/\x1b]0;owned\x07[red]x", 5000)],
        "RUN \x1b[2J[bold]pwned[/bold]",
    )
    result = run_cli(["image", "audit", f"oci:{b.ref}"])
    assert result.code == 0, result.stderr
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert "?[2J[bold]pwned[/bold]" in result.stdout
