"""Red team of the engine cache: each test names its attacker and what they tried.

- A bucket writer without the secret: a tar member's header data (a pax extended header, a
  GNU long name) as large as the manifest's declared sizes allow, which tarfile reads whole
  into memory before a single member is checked.
- A bucket writer when the Python API was given an empty (or short) secret: an HMAC under a
  key anyone can guess.
- Anyone who can read the bucket: secrets the engine was started with (``--hf-token``,
  ``--api_key`` spelt with an underscore as vLLM accepts it, a generic engine's ``--token``)
  published in the manifest's ``key_parts``.
- A key that lies: vLLM's ``--config file.yaml`` whose contents change compilation while the
  key only holds its path; a model directory after an option; FLASHINFER_/DG_ variables.
- A bucket writer without the secret: files in millions of directories (inodes, blocks).
- The engine writing a file name that is not UTF-8 (a key whose restores fail for good).
- A network attacker on a plain http:// origin; a local user owning a directory above the
  cache root of a root-run guard; a lying peer whose refused bytes stayed in archives_dir.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import json
import os
import tarfile
import tracemalloc
from pathlib import Path

import pytest
import zstandard

from spotstart.enginecache import CacheKey, EngineCacheConfig, engine_env, publish, restore
from spotstart.enginecache.archive import ArchiveRefused, FileEntry, extract
from spotstart.enginecache.key import canonical, engine_args, key_of

MIB = 1 << 20


def _block_pad(n: int) -> bytes:
    return b"\0" * (-n % 512)


def _header(name: str, size: int, typeflag: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mode = size, typeflag, 0o644
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _meta_bomb(typeflag: bytes, size: int) -> bytes:
    """A tar.zst whose first header (of ``typeflag``) carries ``size`` bytes of data, then one
    small regular member ``vllm/a``: a few KiB compressed."""
    out = io.BytesIO()
    with zstandard.ZstdCompressor(level=1).stream_writer(out, closefd=False) as zw:
        zw.write(_header("././@LongLink" if typeflag in b"LK" else "pax", size, typeflag))
        if typeflag in (tarfile.XHDTYPE, tarfile.XGLTYPE):
            head = f"{size} comment=".encode()
            body_len = size - len(head) - 1
            zw.write(head)
            left = body_len
        else:
            left = size
        chunk = b"a" * MIB
        while left > 0:
            zw.write(chunk[: min(left, MIB)])
            left -= min(left, MIB)
        if typeflag in (tarfile.XHDTYPE, tarfile.XGLTYPE):
            zw.write(b"\n")
        zw.write(_block_pad(size))
        zw.write(_header("vllm/a", 4, tarfile.REGTYPE) + b"abcd" + _block_pad(4))
        zw.write(b"\0" * 1024)
    return out.getvalue()


@pytest.mark.parametrize(
    "typeflag", [tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME], ids=["x", "g", "L"]
)
def test_a_huge_tar_header_is_refused_without_reading_it_into_memory(
    tmp_path: Path, typeflag: bytes
) -> None:
    """Bucket writer without the secret: the manifest declares one 200 MiB file (within
    max_bytes), so decompression may run to 200 MiB; the archive opens with a 64 MiB pax
    header (or GNU long name) instead. tarfile would read all of it into one bytes object
    (twice, joined): memory, not the disk, is what the bound must protect."""
    archive = _meta_bomb(typeflag, 64 * MIB)
    assert len(archive) < 64 * 1024  # a few KiB in the bucket
    files = {"vllm/a": FileEntry("vllm/a", 200 * MIB, "0" * 64, 0o644)}
    dest = tmp_path / "dest"
    dest.mkdir(mode=0o700)
    tracemalloc.start()
    try:
        with pytest.raises(ArchiveRefused):
            extract(io.BytesIO(archive), files, dest, "stage")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * MIB, f"peak {peak / MIB:.0f} MiB held while refusing a header"


def _sparse_archive() -> tuple[bytes, FileEntry]:
    """A pax GNU sparse 1.0 member: 1 MiB real size, 4 bytes of data, the rest holes."""
    real = 1 * MIB
    sparse_map = b"1\n0\n4\n"  # one region: offset 0, 4 bytes
    data = sparse_map + _block_pad(len(sparse_map)) + b"abcd"
    pax = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": "vllm/s",
        "GNU.sparse.realsize": str(real),
    }
    info = tarfile.TarInfo("vllm/GNUSparseFile.0/s")
    info.size, info.type, info.mode = len(data), tarfile.REGTYPE, 0o644
    info.pax_headers = pax
    raw = info.tobuf(format=tarfile.PAX_FORMAT) + data + _block_pad(len(data)) + b"\0" * 1024
    content = b"abcd" + b"\0" * (real - 4)
    entry = FileEntry("vllm/s", real, hashlib.sha256(content).hexdigest(), 0o644)
    return zstandard.ZstdCompressor().compress(raw), entry


def test_a_sparse_member_is_refused(tmp_path: Path) -> None:
    """Bucket writer without the secret: a pax sparse member is a REGTYPE whose holes tarfile
    fills with zeros never decompressed (bytes written beyond what the bound counts). Pack
    never writes one; extract must not accept one."""
    archive, entry = _sparse_archive()
    dest = tmp_path / "dest"
    dest.mkdir(mode=0o700)
    with pytest.raises(ArchiveRefused, match="sparse"):
        extract(io.BytesIO(archive), {entry.path: entry}, dest, "stage")


# --- the secret -----------------------------------------------------------------------------


def _fill(cfg: EngineCacheConfig) -> None:
    from spotstart.enginecache import engine_env

    engine_env(cfg, [])
    p = cfg.root / "vllm" / "torch_compile_cache" / "k" / "model.py"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"code" * 100)


@pytest.mark.parametrize("weak", [b"", b"short"])
def test_an_empty_or_short_secret_is_refused_not_used(tmp_path: Path, weak: bytes) -> None:
    """Bucket writer without the secret, when a caller of the Python API configured b"" (an
    unset env var read as empty) or a few bytes: they sign their manifest with the same guess.
    The guard's CLI refuses such keys; EngineCacheConfig's users must not get a check that
    anyone passes."""
    (tmp_path / "bucket").mkdir()
    parts: dict[str, object] = {"format": 1, "t": "weak"}
    key = CacheKey(key_of(parts), parts)
    pub = EngineCacheConfig(f"file://{tmp_path}/bucket", tmp_path / "pub")
    _fill(pub)
    assert asyncio.run(publish(pub, key)).status == "published"
    where = tmp_path / "bucket" / key.digest / "manifest.json"
    doc = json.loads(where.read_bytes())
    body = canonical({k: v for k, v in doc.items() if k != "hmac"})
    doc["hmac"] = hmac.new(weak, body, hashlib.sha256).hexdigest()  # the attacker's guess
    where.chmod(0o644)
    where.write_bytes(canonical(doc))
    r = EngineCacheConfig(pub.url, tmp_path / "r", secret=weak)
    out = asyncio.run(restore(r, key))
    assert out.status == "failed" and "secret" in out.reason
    # nor does a publish sign with it
    p2 = EngineCacheConfig(f"file://{tmp_path}/bucket2", tmp_path / "pub2", secret=weak)
    (tmp_path / "bucket2").mkdir()
    _fill(p2)
    out = asyncio.run(publish(p2, key))
    assert out.status == "failed" and "secret" in out.reason


# --- the key ----------------------------------------------------------------------------------

SECRET = "hf_SeCrEtVaLuE0123456789"


@pytest.mark.parametrize(
    "argv",
    [
        ["vllm", "serve", "/m", "--hf-token", SECRET],
        ["vllm", "serve", "/m", f"--hf-token={SECRET}"],
        ["vllm", "serve", "/m", "--api_key", SECRET],  # vLLM turns '_' into '-' in names
        ["vllm", "serve", "/m", f"--api_key={SECRET}", "--port", "1"],
        ["python", "-m", "vllm.entrypoints.openai.api_server", "--hf_token", SECRET],
        ["python", "server.py", "--api-key", SECRET, "--compile"],
        ["python", "server.py", f"--token={SECRET}"],
        ["./engine", "--auth-token", SECRET],
    ],
)
def test_secrets_in_argv_are_never_published_in_key_parts(argv: list[str]) -> None:
    """Anyone who can READ the bucket reads every manifest's key_parts: a token the engine
    was started with must not be there."""
    parts = engine_args(argv)
    assert SECRET not in canonical(parts).decode()


def test_options_that_merely_contain_token_or_key_stay_in_the_key() -> None:
    a = engine_args(["vllm", "serve", "/m", "--max-num-batched-tokens", "8192"])
    b = engine_args(["vllm", "serve", "/m", "--max-num-batched-tokens", "512"])
    assert a != b
    g1 = engine_args(["python", "s.py", "--max-tokens", "8"])
    g2 = engine_args(["python", "s.py", "--max-tokens", "9"])
    assert g1 != g2


def test_vllm_option_spellings_with_underscores_are_the_same_key() -> None:
    """vLLM reads --max_model_len as --max-model-len and drops --uvicorn_log_level as it
    drops --uvicorn-log-level: same engine, same key (no needless miss)."""
    assert engine_args(["vllm", "serve", "/m", "--max_model_len", "4096"]) == engine_args(
        ["vllm", "serve", "/m", "--max-model-len", "4096"]
    )
    assert engine_args(["vllm", "serve", "/m", "--uvicorn_log_level", "debug"]) == engine_args(
        ["vllm", "serve", "/m"]
    )


def test_a_vllm_config_file_is_keyed_by_its_contents(tmp_path: Path) -> None:
    """A key that lies: `vllm serve --config c.yaml` reads max_model_len (and the rest) from
    the file; the same path with other contents is another compilation."""
    c = tmp_path / "c.yaml"
    c.write_text("max_model_len: 1024\n")
    one = engine_args(["vllm", "serve", "/m", "--config", str(c)])
    c.write_text("max_model_len: 4096\n")
    two = engine_args(["vllm", "serve", "/m", "--config", str(c)])
    three = engine_args(["vllm", "serve", "/m", f"--config={c}"])
    assert one != two
    assert two == three


# --- directories --------------------------------------------------------------------------


def test_a_manifest_whose_files_need_more_directories_than_max_files_is_refused() -> None:
    """Bucket writer without the secret: every file at depth 60 in its own chain of
    directories. Files, bytes and the manifest's size are in bounds, but each file costs ~60
    directories (an inode and a 4 KiB block each): 60,000 files in a 16 MiB manifest would
    make ~3.6 million directories, ~14 GiB, that max_bytes never counted."""
    from spotstart.enginecache.manifest import FORMAT, check

    parts: dict[str, object] = {"format": 1, "t": "dirs"}
    key = CacheKey(key_of(parts), parts)
    cfg = EngineCacheConfig("file:///x", Path("/nowhere"), max_files=100)
    empty = hashlib.sha256(b"").hexdigest()
    files = [
        {"path": "vllm/" + "/".join([f"d{i}"] * 60) + "/f", "size": 0, "sha256": empty, "mode": 420}
        for i in range(50)
    ]
    doc = {
        "format": FORMAT,
        "key": key.digest,
        "archive": {"name": f"{empty}.tar.zst", "size": 10, "sha256": empty},
        "files": files,
    }
    with pytest.raises(ArchiveRefused, match="directories"):
        check(canonical(doc), key, cfg)
    # the same 50 files in one directory are fine
    for i, f in enumerate(files):
        f["path"] = f"vllm/d/f{i}"
    _, got = check(canonical(doc), key, cfg)
    assert len(got) == 50


def _model_dir(d: Path, layers: int) -> str:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"num_hidden_layers": layers}))
    return str(d)


@pytest.mark.parametrize(
    "before",
    [
        ["--middleware", "my.Mw"],  # single-valued in vLLM 0.32 (append), not nargs='+'
        ["--allowed-origins", '["*"]'],  # json.loads, nargs removed
        ["--max-model-len", "4096"],  # kept, one value: the model after it is the model
        ["--enforce-eager"],
    ],
)
def test_the_model_after_an_option_is_keyed_by_its_config(
    tmp_path: Path, before: list[str]
) -> None:
    """A key that lies: `vllm serve OPTION VALUE /models/m` with /models/m replaced by another
    model (a new revision mounted at the same path): vLLM serves the new model, the key must
    change."""
    m = tmp_path / "m"
    one = engine_args(["vllm", "serve", *before, _model_dir(m, 2)])
    two = engine_args(["vllm", "serve", *before, _model_dir(m, 32)])
    assert canonical(one) != canonical(two)


def test_flashinfer_and_deepgemm_jit_settings_are_in_the_key() -> None:
    """A key that lies: FLASHINFER_CUDA_ARCH_LIST / DG_JIT_* change what those JITs build
    (into directories we cache); the cache paths we set ourselves stay out."""
    from spotstart.enginecache.key import env_parts

    a = env_parts({"FLASHINFER_CUDA_ARCH_LIST": "8.0", "FLASHINFER_WORKSPACE_BASE": "/r/fi"})
    b = env_parts({"FLASHINFER_CUDA_ARCH_LIST": "9.0a", "FLASHINFER_WORKSPACE_BASE": "/x/fi"})
    assert a != b
    assert "FLASHINFER_WORKSPACE_BASE" not in a
    c = env_parts({"DG_JIT_USE_NVRTC": "1", "DG_JIT_CACHE_DIR": "/r/dg"})
    assert c == {"DG_JIT_USE_NVRTC": "1"}


def test_a_generic_engines_model_directory_is_keyed_by_its_config(tmp_path: Path) -> None:
    """A key that lies: `python server.py --model /models/m` (the example server) with another
    model mounted at the same path."""
    m = tmp_path / "m"
    for form in (["--model", str(m)], [f"--model={m}"]):
        _model_dir(m, 2)
        one = engine_args(["python", "/nonexistent/server.py", *form, "--compile"])
        _model_dir(m, 32)
        two = engine_args(["python", "/nonexistent/server.py", *form, "--compile"])
        assert canonical(one) != canonical(two), form


def test_a_file_name_that_is_not_utf8_does_not_poison_the_key(tmp_path: Path) -> None:
    """The engine (or anything it loads) writes a file whose name is not UTF-8: pack used to
    publish it as a lone surrogate, which the manifest's JSON reader turns into '?', so every
    restore of that key failed (member not in the manifest) and, create-only, the manifest is
    never replaced: cold starts for good. Such a name is skipped when packing."""
    import os

    (tmp_path / "bucket").mkdir()
    parts: dict[str, object] = {"format": 1, "t": "utf8"}
    key = CacheKey(key_of(parts), parts)
    pub = EngineCacheConfig(f"file://{tmp_path}/bucket", tmp_path / "pub")
    _fill(pub)
    os.close(os.open(os.fsencode(pub.root / "vllm") + b"/bad\xffname", os.O_CREAT | os.O_WRONLY))
    out = asyncio.run(publish(pub, key))
    assert out.status == "published" and "bad_name" in out.reason
    got = asyncio.run(restore(EngineCacheConfig(pub.url, tmp_path / "r"), key))
    assert got.status == "hit", got.reason


def test_plain_http_from_another_host_without_a_secret_is_refused(tmp_path: Path) -> None:
    """Anyone on the network path of a plain http:// origin answers as the bucket: without a
    secret they would choose the code our engine runs. Refused before any request (https, a
    secret, or a loopback origin are taken)."""
    parts: dict[str, object] = {"format": 1, "t": "http"}
    key = CacheKey(key_of(parts), parts)
    cfg = EngineCacheConfig("http://192.0.2.1:9/cache", tmp_path / "r")  # TEST-NET: no answer
    out = asyncio.run(restore(cfg, key))
    assert out.status == "failed"
    assert "https" in out.reason and "secret" in out.reason


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root")
def test_root_refuses_a_cache_root_beneath_another_users_directory(tmp_path: Path) -> None:
    """A local user, the caller is root: --engine-cache-dir beneath a directory another user
    owns. The restore itself is pinned, but the engine is given path strings: the owner
    renames the root away and puts a link to their own files in its place, and root's engine
    runs their code. Refused up front."""
    alice = tmp_path / "alice"
    alice.mkdir(mode=0o755)
    os.chown(alice, 65534, 65534)
    cfg = EngineCacheConfig("file:///nowhere", alice / "cache")
    from spotstart.errors import UnsafePath

    with pytest.raises(UnsafePath, match="owned by uid 65534"):
        engine_env(cfg, [])
    parts: dict[str, object] = {"format": 1, "t": "alice"}
    out = asyncio.run(restore(cfg, CacheKey(key_of(parts), parts)))
    assert out.status == "failed" and "65534" in out.reason


def test_a_config_that_is_a_fifo_does_not_hang_the_key(tmp_path: Path) -> None:
    fifo = tmp_path / "c.yaml"
    os.mkfifo(fifo)
    parts = engine_args(["vllm", "serve", "/m", "--config", str(fifo)])
    assert "not a file" in canonical(parts).decode()


def test_an_archive_that_fails_its_sha256_is_not_kept_to_fail_every_later_restore(
    tmp_path: Path,
) -> None:
    """A lying peer (or a damaged disk) leaves other bytes under the archive's name in
    archives_dir, same size and mtime: the restore refuses them, but they stayed there, indexed
    as fetched: every later restore on this node failed without fetching again, and the
    node's PeerServer kept serving them to its peers. Refused bytes are removed; the next
    restore fetches the true archive from the origin."""
    (tmp_path / "bucket").mkdir()
    parts: dict[str, object] = {"format": 1, "t": "poison"}
    key = CacheKey(key_of(parts), parts)
    pub = EngineCacheConfig(f"file://{tmp_path}/bucket", tmp_path / "pub")
    _fill(pub)
    assert asyncio.run(publish(pub, key)).status == "published"
    r = EngineCacheConfig(pub.url, tmp_path / "r")
    assert asyncio.run(restore(r, key)).status == "hit"
    (arch,) = (tmp_path / "r" / "archives").glob("*.tar.zst")
    st = arch.stat()
    data = bytearray(arch.read_bytes())
    data[-5] ^= 1
    arch.write_bytes(bytes(data))
    os.utime(arch, ns=(st.st_atime_ns, st.st_mtime_ns))
    bad = asyncio.run(restore(r, key))
    assert bad.status == "failed" and "sha256" in bad.reason
    again = asyncio.run(restore(r, key))
    assert again.status == "hit", again.reason
