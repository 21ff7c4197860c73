"""Restore and publish against real servers on 127.0.0.1 (file://, the S3 and GCS emulators of
the shared cloud, gcp-storage-emulator, Azurite): round trips, create-only publishing under a race,
manifests that name another key or fail their HMAC, archives that do not hash to the
manifest, a peer serving a restored archive to a second replica, and the events they record."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from spotstart.emulate.azurite import ACCOUNT, ACCOUNT_KEY, Azurite, azurite_dir
from spotstart.emulate.crosscheck import GcsEmulator
from spotstart.emulate.storage import StorageEmulator
from spotstart.enginecache import (
    CacheKey,
    EngineCacheConfig,
    Outcome,
    archives_dir,
    engine_env,
    publish,
    restore,
)
from spotstart.enginecache.dirs import packed_dirs, tmp_inductor
from spotstart.enginecache.key import canonical, key_of
from spotstart.fetch.peer_server import PeerServer, PeerServerThread
from tests.conftest import BUCKET

TOKEN = "t" * 40


def _key(tag: str = "") -> CacheKey:
    parts: dict[str, object] = {"format": 1, "test": tag or secrets.token_hex(8)}
    return CacheKey(key_of(parts), parts)


def _fill(cfg: EngineCacheConfig, seed: bytes = b"") -> dict[str, str]:
    """Write a small cache as an engine would; returns {path beneath root: sha256}."""
    engine_env(cfg, [])
    r = cfg.root
    files = {
        "vllm/torch_compile_cache/abc/rank_0_0/model.py": b"code" * 300 + seed,
        "inductor/fxgraph/xy/entry": os.urandom(20_000),
        "triton/KEY/kernel.so": b"\x7fELF" + seed + os.urandom(3000),
        f"{tmp_inductor()}/precompiled_headers/h.gch": b"hdr" * 1000,
    }
    out = {}
    for rel, data in files.items():
        p = r / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        out[rel] = hashlib.sha256(data).hexdigest()
    return out


def _caches(root: Path) -> dict[str, str]:
    out = {}
    for local, _ in packed_dirs():
        base = root / local
        for dirpath, _, names in os.walk(base):
            for n in names:
                p = Path(dirpath) / n
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _empty(root: Path) -> bool:
    return _caches(root) == {} and all((root / d).is_dir() for d, _ in packed_dirs())


def _run(coro: object) -> Outcome:
    return asyncio.run(coro)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    installed = (azurite_dir() / "node_modules/.bin/azurite-blob").is_file()
    if shutil.which("node") is None or (not installed and shutil.which("npm") is None):
        pytest.fail("Azurite needs Node.js and npm (node/npm not found on PATH)")
    with Azurite(tmp_path_factory.mktemp("azurite")) as az:
        az.create_container(BUCKET)
        yield az


@pytest.fixture(params=["file", "seaweedfs-s3", "fake-gcs", "gcp-storage-emulator", "azurite"])
def url(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh prefix on each store."""
    prefix = f"ec-{secrets.token_hex(6)}"
    if request.param == "azurite":
        az: Azurite = request.getfixturevalue("azurite")
        for k in list(os.environ):
            if k.startswith(("AZURE_", "AZURITE_")):
                monkeypatch.delenv(k)
        monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_NAME", ACCOUNT)
        monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_KEY", ACCOUNT_KEY)
        monkeypatch.setenv("AZURE_STORAGE_ENDPOINT", az.endpoint)
        return f"az://{BUCKET}/{prefix}"
    if request.param == "file":
        (tmp_path / "bucket").mkdir()
        return f"file://{tmp_path}/bucket/{prefix}"
    if request.param == "gcp-storage-emulator":
        g: GcsEmulator = request.getfixturevalue("gcs_emulator")
        for k, v in g.env().items():
            monkeypatch.setenv(k, v)
        return f"gs://{BUCKET}/{prefix}"
    emu: StorageEmulator = request.getfixturevalue("clean_cloud")
    if request.param == "seaweedfs-s3":
        for k, v in emu.env_for_s3().items():
            monkeypatch.setenv(k, v)
        return f"s3://{BUCKET}/{prefix}"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emu.gcs.endpoint)
    return f"gs://{BUCKET}/{prefix}"


def test_publish_then_restore_on_another_node_is_byte_for_byte(url: str, tmp_path: Path) -> None:
    key = _key()
    a = EngineCacheConfig(url, tmp_path / "a")
    assert _run(restore(a, key)).status == "miss"
    written = _fill(a)
    pub = _run(publish(a, key))
    assert pub.status == "published", pub
    assert pub.files == 4
    assert _run(publish(a, key)).status == "exists"
    b = EngineCacheConfig(url, tmp_path / "b")
    got = _run(restore(b, key))
    assert got.status == "hit", got
    assert got.files == 4
    assert _caches(b.root) == written
    # the archive stays in archives_dir for peers, under its content-addressed name
    assert any(p.name.endswith(".tar.zst") for p in archives_dir(b).iterdir())


def test_a_restore_replaces_what_was_there_and_a_miss_leaves_the_dirs_empty(tmp_path: Path) -> None:
    (tmp_path / "bucket").mkdir()
    cfg = EngineCacheConfig(f"file://{tmp_path}/bucket", tmp_path / "r")
    _fill(cfg, b"stale")  # a previous run's cache (maybe of another key)
    assert _run(restore(cfg, _key())).status == "miss"
    assert _empty(cfg.root)


def _publish_file(
    tmp_path: Path, secret: bytes | None = None
) -> tuple[EngineCacheConfig, CacheKey, Path]:
    (tmp_path / "bucket").mkdir(exist_ok=True)
    cfg = EngineCacheConfig(f"file://{tmp_path}/bucket", tmp_path / "pub", secret=secret)
    key = _key()
    _fill(cfg)
    assert _run(publish(cfg, key)).status == "published"
    return cfg, key, tmp_path / "bucket" / key.digest


def _restorer(
    tmp_path: Path, cfg: EngineCacheConfig, secret: bytes | None = None, name: str = "r"
) -> EngineCacheConfig:
    return EngineCacheConfig(cfg.url, tmp_path / name, secret=secret)


def test_a_manifest_naming_another_key_is_refused(tmp_path: Path) -> None:
    cfg, _, where = _publish_file(tmp_path)
    other = _key()
    (where.parent / other.digest).mkdir()
    for f in where.iterdir():
        (where.parent / other.digest / f.name).write_bytes(f.read_bytes())
    r = _restorer(tmp_path, cfg)
    out = _run(restore(r, other))
    assert out.status == "failed"
    assert "not " + other.digest in out.reason
    assert _empty(r.root)


def test_hmac_on_and_off(tmp_path: Path) -> None:
    secret = b"s" * 32
    cfg, key, where = _publish_file(tmp_path, secret)
    doc = json.loads((where / "manifest.json").read_bytes())
    assert len(doc["hmac"]) == 64
    assert _run(restore(_restorer(tmp_path, cfg, secret, "ok"), key)).status == "hit"
    assert _run(restore(_restorer(tmp_path, cfg, None, "nosecret"), key)).status == "hit"
    wrong = _run(restore(_restorer(tmp_path, cfg, b"x" * 32, "wrong"), key))
    assert wrong.status == "failed" and "hmac" in wrong.reason
    # an attacker who can write the bucket but lacks the secret edits one file's digest
    doc["files"][0]["sha256"] = "0" * 64
    (where / "manifest.json").write_bytes(canonical(doc))
    forged = _run(restore(_restorer(tmp_path, cfg, secret, "forged"), key))
    assert forged.status == "failed" and "hmac" in forged.reason
    assert _empty(tmp_path / "forged")
    # a manifest without hmac, when a secret is configured
    del doc["hmac"]
    (where / "manifest.json").write_bytes(canonical(doc))
    assert _run(restore(_restorer(tmp_path, cfg, secret, "unsigned"), key)).status == "failed"


def test_an_archive_that_does_not_hash_to_the_manifest_is_never_extracted(tmp_path: Path) -> None:
    cfg, key, where = _publish_file(tmp_path)
    arch = next(p for p in where.iterdir() if p.name.endswith(".tar.zst"))
    data = bytearray(arch.read_bytes())
    data[-5] ^= 0xFF
    arch.write_bytes(bytes(data))
    r = _restorer(tmp_path, cfg)
    out = _run(restore(r, key))
    assert out.status == "failed" and "sha256" in out.reason
    assert _empty(r.root)


def test_a_hostile_archive_in_the_bucket_fails_the_restore_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    """Someone who can write the bucket (no secret set) publishes an archive with a path that
    leaves the cache and a manifest that agrees with it: refused, dirs empty, nothing out."""
    import io
    import tarfile

    import zstandard

    cfg, key, where = _publish_file(tmp_path)
    payload = b"evil"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        info = tarfile.TarInfo("vllm/ok")
        info.size = 4
        t.addfile(info, io.BytesIO(payload))
        info = tarfile.TarInfo("vllm/../../../escaped")
        info.size = 4
        t.addfile(info, io.BytesIO(payload))
    blob = zstandard.ZstdCompressor().compress(buf.getvalue())
    sha = hashlib.sha256(blob).hexdigest()
    (where / f"{sha}.tar.zst").write_bytes(blob)
    doc = json.loads((where / "manifest.json").read_bytes())
    digest = hashlib.sha256(payload).hexdigest()
    doc["archive"] = {"name": f"{sha}.tar.zst", "size": len(blob), "sha256": sha}
    doc["files"] = [
        {"path": "vllm/ok", "size": 4, "sha256": digest, "mode": 420},
        {"path": "vllm/../../../escaped", "size": 4, "sha256": digest, "mode": 420},
    ]
    (where / "manifest.json").write_bytes(canonical(doc))
    r = _restorer(tmp_path, cfg)
    out = _run(restore(r, key))
    assert out.status == "failed" and "normalized" in out.reason
    assert _empty(r.root)
    assert not (tmp_path / "escaped").exists()


def test_concurrent_publishes_leave_exactly_one_manifest(url: str, tmp_path: Path) -> None:
    key = _key()
    cfgs = [EngineCacheConfig(url, tmp_path / f"n{i}") for i in range(4)]
    wrote = [_fill(c, seed=bytes([i])) for i, c in enumerate(cfgs)]

    async def all_four() -> list[Outcome]:
        return list(await asyncio.gather(*(publish(c, key) for c in cfgs)))

    outs = asyncio.run(all_four())
    statuses = sorted(o.status for o in outs)
    if statuses != ["exists", "exists", "exists", "published"]:
        gcp = os.environ.get("STORAGE_EMULATOR_HOST", "")
        pytest.xfail(f"this store ignores create-only ({statuses}, {gcp})")  # gcp-storage-emulator
    winner = wrote[[o.status for o in outs].index("published")]
    r = EngineCacheConfig(url, tmp_path / "reader")
    assert _run(restore(r, key)).status == "hit"
    assert _caches(r.root) == winner


def test_a_peer_serves_a_restored_archive_to_a_second_replica(
    clean_cloud: StorageEmulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for k, v in clean_cloud.env_for_s3().items():
        monkeypatch.setenv(k, v)
    url = f"s3://{BUCKET}/ec-peer-{secrets.token_hex(4)}"
    key = _key()
    pub = EngineCacheConfig(url, tmp_path / "pub")
    written = _fill(pub)
    assert _run(publish(pub, key)).status == "published"
    first = EngineCacheConfig(url, tmp_path / "first")
    assert _run(restore(first, key)).status == "hit"
    server = PeerServer(archives_dir(first), token=TOKEN)
    thread = PeerServerThread(server)
    port = thread.start("127.0.0.1", 0)
    try:
        second = EngineCacheConfig(
            url, tmp_path / "second", peers=(f"127.0.0.1:{port}",), peer_token=TOKEN
        )
        out = _run(restore(second, key))
    finally:
        thread.close()
    assert out.status == "hit", out
    assert _caches(second.root) == written
    assert server.bytes_served > 0


def test_http_urls_restore_only(tmp_path: Path) -> None:
    cfg = EngineCacheConfig("https://127.0.0.1:9/cache", tmp_path / "r")
    _fill(cfg)
    out = _run(publish(cfg, _key()))
    assert out.status == "skipped" and "http" in out.reason
    assert (
        _run(publish(EngineCacheConfig("file:///x", tmp_path / "r", publish=False), _key())).status
        == "skipped"
    )


def test_an_unreachable_bucket_fails_the_restore_with_a_reason(tmp_path: Path) -> None:
    cfg = EngineCacheConfig("https://127.0.0.1:9/cache", tmp_path / "r")
    out = _run(restore(cfg, _key()))
    assert out.status == "failed" and out.reason
    assert _empty(cfg.root)


def test_restore_and_publish_record_events(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "events.jsonl"
    monkeypatch.setenv("SPOTSTART_EVENTS", str(log))
    (tmp_path / "bucket").mkdir()
    cfg = EngineCacheConfig(f"file://{tmp_path}/bucket", tmp_path / "r")
    key = _key()
    _run(restore(cfg, key))
    _fill(cfg)
    _run(publish(cfg, key))
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["phase"], e["outcome"], e["key"]) for e in events] == [
        ("engine-cache-restore", "miss", key.digest),
        ("engine-cache-publish", "published", key.digest),
    ]
    assert events[1]["bytes"] > 0


def test_restore_over_http_from_a_published_tree(nginx: object, tmp_path: Path) -> None:
    """A bucket published once (here: file:// beneath nginx's root) restores over http."""
    root: Path = nginx.root  # type: ignore[attr-defined]
    prefix = f"ec-{secrets.token_hex(4)}"
    pub = EngineCacheConfig(f"file://{root}/{prefix}", tmp_path / "pub")
    key = _key()
    written = _fill(pub)
    assert _run(publish(pub, key)).status == "published"
    for dirpath, dirs, names in os.walk(root / prefix):  # nginx runs as another user
        for n in dirs + names:
            os.chmod(Path(dirpath) / n, 0o755)
    base = nginx.endpoint  # type: ignore[attr-defined]
    cfg = EngineCacheConfig(f"{base}/{prefix}", tmp_path / "r")
    out = _run(restore(cfg, key))
    assert out.status == "hit", out
    assert _caches(cfg.root) == written
    assert (
        _run(restore(EngineCacheConfig(f"{base}/{prefix}", tmp_path / "m"), _key())).status
        == "miss"
    )


def test_a_peer_that_serves_other_bytes_never_gets_them_extracted(
    clean_cloud: StorageEmulator,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A peer whose copy of the archive was altered (same size, same mtime, so it still
    serves it) answers the second replica: the bytes it sends are never extracted; the
    restore either fetches the true bytes from the origin (fetch's own checks) or fails
    on the manifest's SHA-256, with the cache dirs empty."""
    for k, v in clean_cloud.env_for_s3().items():
        monkeypatch.setenv(k, v)
    url = f"s3://{BUCKET}/ec-liar-{secrets.token_hex(4)}"
    key = _key()
    pub = EngineCacheConfig(url, tmp_path / "pub")
    written = _fill(pub)
    assert _run(publish(pub, key)).status == "published"
    first = EngineCacheConfig(url, tmp_path / "first")
    assert _run(restore(first, key)).status == "hit"
    arch = next(p for p in archives_dir(first).iterdir() if p.name.endswith(".tar.zst"))
    st = arch.stat()
    data = bytearray(arch.read_bytes())
    for i in range(0, len(data), 997):
        data[i] ^= 0x5A
    arch.write_bytes(bytes(data))
    os.utime(arch, ns=(st.st_atime_ns, st.st_mtime_ns))
    server = PeerServer(archives_dir(first), token=TOKEN)
    thread = PeerServerThread(server)
    port = thread.start("127.0.0.1", 0)
    try:
        second = EngineCacheConfig(
            url, tmp_path / "second", peers=(f"127.0.0.1:{port}",), peer_token=TOKEN
        )
        out = _run(restore(second, key))
    finally:
        thread.close()
    assert server.bytes_served > 0  # the peer was asked, and answered with its bytes
    assert out.status in ("hit", "failed"), out
    if out.status == "hit":
        assert _caches(second.root) == written
    else:
        assert "sha256" in out.reason
        assert _empty(second.root)


def test_a_root_beneath_the_users_link_works_and_a_root_that_is_a_link_is_refused(
    tmp_path: Path,
) -> None:
    (tmp_path / "bucket").mkdir()
    (tmp_path / "disk").mkdir()
    (tmp_path / "nvme").symlink_to(tmp_path / "disk")  # /nvme -> /mnt/disk1: the user's choice
    url = f"file://{tmp_path}/bucket"
    key = _key()
    pub = EngineCacheConfig(url, tmp_path / "nvme" / "cache")
    written = _fill(pub)
    assert _run(publish(pub, key)).status == "published"
    r = EngineCacheConfig(url, tmp_path / "nvme" / "cache2")
    assert _run(restore(r, key)).status == "hit"
    assert _caches(tmp_path / "disk" / "cache2") == written
    (tmp_path / "disk" / "elsewhere").mkdir(mode=0o700)
    (tmp_path / "disk" / "cache3").symlink_to(tmp_path / "disk" / "elsewhere")
    out = _run(restore(EngineCacheConfig(url, tmp_path / "nvme" / "cache3"), key))
    assert out.status == "failed" and "symlink" in out.reason
    assert list((tmp_path / "disk" / "elsewhere").iterdir()) == []


def test_a_root_someone_else_may_write_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bucket").mkdir()
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    out = _run(restore(EngineCacheConfig(f"file://{tmp_path}/bucket", shared), _key()))
    assert out.status == "failed" and "writable by group or others" in out.reason
