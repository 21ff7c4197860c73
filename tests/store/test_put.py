"""``put`` on every store that takes writes (seaweedfs, moto, fake-gcs-server, Azurite, local
files), and ``spotstart manifest`` round trips on each: the manifest is uploaded beside the
model and reads back with the digests of the origin's bytes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from spotstart.cli.main import main
from spotstart.emulate.azurite import ACCOUNT, ACCOUNT_KEY, Azurite, azurite_dir
from spotstart.fetch.manifest import MANIFEST_NAME, MANIFEST_SUFFIX, parse_manifest
from spotstart.store import HttpOptions, ObjectWriter, RangeSource, open_source, parse_url
from tests.conftest import Store

MiB = 1 << 20
# Not gcp-storage-emulator: it parses every application/json request body as JSON metadata,
# so a media upload of a JSON document (the manifest) breaks its handler (the connection
# drops); GCS and fake-gcs-server store the body as given.
WRITABLE = ("seaweedfs", "moto", "fake-gcs")


def _read(url: str, key: str, endpoint: str | None = None) -> bytes:
    async def go() -> bytes:
        source: RangeSource = open_source(parse_url(url), HttpOptions(), endpoint=endpoint)
        try:
            info = await source.stat(key)
            out: list[bytes] = []

            async def sink(piece: bytes) -> None:
                out.append(piece)

            await source.read(info, 0, info.size, sink)
            return b"".join(out)
        finally:
            await source.close()

    return asyncio.run(go())


def _put(url: str, key: str, data: bytes, endpoint: str | None = None) -> None:
    async def go() -> None:
        source = open_source(parse_url(url), HttpOptions(), endpoint=endpoint)
        try:
            assert isinstance(source, ObjectWriter)
            await source.put(key, data, "application/json")
        finally:
            await source.close()

    asyncio.run(go())


def _manifest(args: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    capsys.readouterr()
    assert main(["manifest", *args, "--json"]) == 0
    return dict(json.loads(capsys.readouterr().out))


def _check_manifest(raw: bytes, url_of: dict[str, bytes]) -> None:
    m = parse_manifest(raw)
    assert sorted(m.entries) == sorted(url_of)
    for url, data in url_of.items():
        e = m.entries[url]
        assert e.size == len(data) and e.sha256 == hashlib.sha256(data).digest()
        assert e.pieces[0] == hashlib.sha256(data[: e.piece_bytes]).digest()


@pytest.mark.parametrize("store", WRITABLE, indirect=True)
def test_put_then_read_back_and_a_manifest_round_trip(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    base = store.base
    _put(base, "put/x.json", b'{"a": 1}')
    assert _read(base, "put/x.json") == b'{"a": 1}'
    _put(base, "put/x.json", b'{"a": 2}')  # replaces
    assert _read(base, "put/x.json") == b'{"a": 2}'
    model = {"mf/w.bin": os.urandom(2 * MiB + 3), "mf/sub/c.json": b"{}"}
    store.seed(model)
    out = _manifest([f"{base}/mf/", "--piece-size", "1MiB"], capsys)
    assert out["manifest"] == f"{base}/mf/{MANIFEST_NAME}" and out["objects"] == 2
    _check_manifest(
        _read(base, f"mf/{MANIFEST_NAME}"), {f"{base}/{k}": v for k, v in model.items()}
    )
    # a second run reads the objects again, never the manifest itself
    assert _manifest([f"{base}/mf/"], capsys)["objects"] == 2
    one = _manifest([f"{base}/mf/w.bin"], capsys)
    assert one["manifest"] == f"{base}/mf/w.bin{MANIFEST_SUFFIX}"
    _check_manifest(
        _read(base, f"mf/w.bin{MANIFEST_SUFFIX}"), {f"{base}/mf/w.bin": model["mf/w.bin"]}
    )


def test_file_put_replaces_through_a_fresh_name_and_never_follows_a_planted_link(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "m"
    root.mkdir()
    data = os.urandom(MiB + 1)
    (root / "w.bin").write_bytes(data)
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (root / MANIFEST_NAME).symlink_to(victim)  # planted: the rename replaces the link
    out = _manifest([f"file://{root}/"], capsys)
    assert out["manifest"] == str(root / MANIFEST_NAME)
    assert victim.read_bytes() == b"keep" and not (root / MANIFEST_NAME).is_symlink()
    _check_manifest((root / MANIFEST_NAME).read_bytes(), {str(root / "w.bin")[1:]: data})
    assert [p.name for p in root.iterdir() if p.name.endswith(".tmp")] == []


def test_manifest_out_writes_a_local_file_and_http_needs_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "m"
    root.mkdir()
    (root / "w.bin").write_bytes(b"x" * 1000)
    out = _manifest([f"file://{root}/w.bin", "--out", str(tmp_path / "o.json")], capsys)
    assert out["manifest"] == str(tmp_path / "o.json")
    parse_manifest((tmp_path / "o.json").read_bytes())
    assert not (root / f"w.bin{MANIFEST_SUFFIX}").exists()
    assert main(["manifest", "http://127.0.0.1:9/x.bin"]) == 2
    assert "use --out FILE" in capsys.readouterr().err
    assert main(["manifest", f"file://{root}/", "--piece-size", "1KiB"]) == 2


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    installed = (azurite_dir() / "node_modules/.bin/azurite-blob").is_file()
    if shutil.which("node") is None or (not installed and shutil.which("npm") is None):
        pytest.skip("Azurite needs Node.js and npm (node/npm not found on PATH)")
    with Azurite(tmp_path_factory.mktemp("azurite")) as az:
        az.create_container("models")
        yield az


def test_azure_put_and_a_manifest_round_trip(
    azurite: Azurite, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for key in list(os.environ):
        if key.startswith(("AZURE_", "AZURITE_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_NAME", ACCOUNT)
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_KEY", ACCOUNT_KEY)
    base = "az://models"
    _put(base, "put/x.json", b"[]", endpoint=azurite.endpoint)
    assert _read(base, "put/x.json", endpoint=azurite.endpoint) == b"[]"
    data = os.urandom(MiB + 7)
    azurite.put("models", "mf/w.bin", data)
    out = _manifest([f"{base}/mf/", "--endpoint", azurite.endpoint], capsys)
    assert out["manifest"] == f"{base}/mf/{MANIFEST_NAME}"
    raw = _read(base, f"mf/{MANIFEST_NAME}", endpoint=azurite.endpoint)
    _check_manifest(raw, {f"{base}/mf/w.bin": data})
