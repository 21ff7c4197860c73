"""az:// sources against a real Azurite (from npm) started once for this module: stat, list,
ranged reads, version pinning, the error mapping at the seam, and an end-to-end fetch."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from obstore.exceptions import GenericError

import spotstart
from spotstart.emulate.azurite import ACCOUNT, ACCOUNT_KEY, Azurite, azurite_dir
from spotstart.errors import (
    AccessDenied,
    CredentialsNotFound,
    EndpointUnreachable,
    NotFound,
    ObjectChanged,
    TransientError,
    UsageError,
)
from spotstart.fetch.config import FetchConfig
from spotstart.store import HttpOptions, ObjectInfo
from spotstart.store.azure import AzureSource, store_config, translate_error

CONTAINER = "models"
MiB = 1 << 20
BLOBS = {
    "llama/model.safetensors": os.urandom(5 * MiB + 123),
    "llama/config.json": b'{"hidden_size": 64}',
    "llama/sub/tokenizer.json": b'{"v": 1}',
    "llama-base/other.bin": b"not under llama/",
}
OPTIONS = HttpOptions(stall_timeout_s=10.0, connect_timeout_s=2.0)


@pytest.fixture(autouse=True)
def _no_azure_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ambient Azure settings; managed-identity lookups point at a closed loopback port
    instead of 169.254.169.254."""
    for key in list(os.environ):
        if key.startswith(("AZURE_", "AZURITE_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("AZURE_MSI_ENDPOINT", "http://127.0.0.1:9/metadata/identity/oauth2/token")
    monkeypatch.setenv("AZURE_IDENTITY_ENDPOINT", "http://127.0.0.1:9/msi/token")


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    installed = (azurite_dir() / "node_modules/.bin/azurite-blob").is_file()
    if shutil.which("node") is None or (not installed and shutil.which("npm") is None):
        pytest.skip("Azurite needs Node.js and npm (node/npm not found on PATH)")
    with Azurite(tmp_path_factory.mktemp("azurite")) as az:
        az.create_container(CONTAINER)
        for key, data in BLOBS.items():
            az.put(CONTAINER, key, data)
        yield az


def _use_key(monkeypatch: pytest.MonkeyPatch, key: str = ACCOUNT_KEY) -> None:
    # obstore reads credential variables from the process environment itself
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_NAME", ACCOUNT)
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_KEY", key)


@pytest.fixture
def source(azurite: Azurite, monkeypatch: pytest.MonkeyPatch) -> AzureSource:
    """The seeded container with the development account's key."""
    _use_key(monkeypatch)
    return _source(azurite)


def _source(azurite: Azurite, container: str = CONTAINER) -> AzureSource:
    return AzureSource(container, OPTIONS, endpoint=azurite.endpoint, env=os.environ)


async def _read(source: AzureSource, obj: ObjectInfo, start: int, length: int) -> bytes:
    pieces: list[bytes] = []

    async def sink(piece: bytes) -> None:
        assert type(piece) is bytes  # google_crc32c takes bytes, not memoryview or Bytes
        pieces.append(piece)

    await source.read(obj, start, length, sink)
    return b"".join(pieces)


async def test_stat_and_list_report_sizes_and_one_etag_spelling(source: AzureSource) -> None:
    info = await source.stat("llama/model.safetensors")
    assert info.size == len(BLOBS["llama/model.safetensors"])
    assert info.version.startswith('"0x')
    listed = {o.key: o for o in await source.list("llama/")}
    assert sorted(listed) == [
        "llama/config.json",
        "llama/model.safetensors",
        "llama/sub/tokenizer.json",
    ]
    assert listed["llama/model.safetensors"] == info
    # "starts with", not whole path segments as obstore's own list matches
    assert {o.key for o in await source.list("llama")} == set(BLOBS)
    assert [o.key for o in await source.list("llama/su")] == ["llama/sub/tokenizer.json"]
    assert await source.list("nothing/") == []


async def test_ranged_reads_are_byte_identical(source: AzureSource) -> None:
    data = BLOBS["llama/model.safetensors"]
    info = await source.stat("llama/model.safetensors")
    for start, length in ((0, 1), (17, 3 * MiB + 5), (len(data) - 1000, 1000), (0, len(data))):
        assert await _read(source, info, start, length) == data[start : start + length]


async def test_read_of_a_replaced_blob_raises_object_changed(
    azurite: Azurite, source: AzureSource
) -> None:
    azurite.put(CONTAINER, "changing.bin", b"a" * 1000)
    old = await source.stat("changing.bin")
    azurite.put(CONTAINER, "changing.bin", b"b" * 1000)
    with pytest.raises(ObjectChanged, match=r"az://models/changing.bin"):
        await _read(source, old, 0, 100)


async def test_a_range_past_the_end_is_not_taken_for_success(source: AzureSource) -> None:
    info = await source.stat("llama/config.json")
    grown = ObjectInfo(info.key, info.size + 10, info.version)
    with pytest.raises(ObjectChanged, match="size changed"):
        await _read(source, grown, 0, grown.size)


async def test_missing_blob_and_missing_container_are_not_found(
    azurite: Azurite, source: AzureSource
) -> None:
    with pytest.raises(NotFound, match=r"az://models/nope\.bin: not found"):
        await source.stat("nope.bin")
    missing = _source(azurite, container="no-such-container")
    with pytest.raises(NotFound, match="ContainerNotFound"):
        await missing.list("llama/")
    with pytest.raises(NotFound):
        await missing.stat("llama/config.json")


async def test_wrong_key_is_access_denied_and_names_the_fix(
    azurite: Azurite, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = "V3JvbmcgYnV0IHdlbGwtZm9ybWVkIGtleSBvZiBzaXh0eS1mb3VyIGJ5dGVzIGxvbmcgLi4uLi4uLi4uLg=="
    _use_key(monkeypatch, wrong)
    source = _source(azurite)
    with pytest.raises(AccessDenied, match=r"HTTP 403.*AZURE_STORAGE_ACCOUNT_KEY"):
        await source.stat("llama/config.json")
    with pytest.raises(AccessDenied, match="AuthorizationFailure"):
        await source.list("llama/")


async def test_closed_port_is_endpoint_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    _use_key(monkeypatch)
    source = AzureSource(CONTAINER, OPTIONS, endpoint=f"http://127.0.0.1:9/{ACCOUNT}")
    with pytest.raises(EndpointUnreachable, match="cannot connect"):
        await source.stat("llama/config.json")


async def test_no_credentials_anywhere_is_credentials_not_found(azurite: Azurite) -> None:
    # no key, no SAS, no CLI: obstore falls through to managed identity (a closed port here)
    env = {"AZURE_STORAGE_ACCOUNT_NAME": ACCOUNT}
    source = AzureSource(CONTAINER, OPTIONS, endpoint=azurite.endpoint, env=env)
    with pytest.raises(CredentialsNotFound, match="az login"):
        await source.stat("llama/config.json")


async def test_anonymous_reads_of_a_private_container_are_denied(azurite: Azurite) -> None:
    env = {"AZURE_STORAGE_ACCOUNT_NAME": ACCOUNT}
    source = AzureSource(CONTAINER, OPTIONS, endpoint=azurite.endpoint, env=env, anonymous=True)
    with pytest.raises(AccessDenied, match="HTTP 403"):
        await source.stat("llama/config.json")


def test_account_and_endpoint_resolve_from_flags_then_environment() -> None:
    env = {"AZURE_STORAGE_ACCOUNT": "acct", "AZURE_STORAGE_ENDPOINT": "https://env.example/"}
    assert store_config("c", env) == {
        "container_name": "c",
        "account_name": "acct",
        "endpoint": "https://env.example",
    }
    flag = store_config("c", env, endpoint="http://127.0.0.1:1/acct", anonymous=True)
    assert flag["endpoint"] == "http://127.0.0.1:1/acct" and flag["skip_signature"] is True
    assert "account_name" not in store_config("c", {"AZURE_STORAGE_USE_EMULATOR": "true"})
    with pytest.raises(UsageError, match="AZURE_STORAGE_ACCOUNT_NAME"):
        store_config("c", {})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Error ... - Server returned non-2xx status code: 503 Service Unavailable: ", "HTTP 503"),
        ("Error ... - Server returned non-2xx status code: 429 Too Many Requests: ", "HTTP 429"),
        ("Generic MicrosoftAzure error: error decoding response body", "GenericError"),
    ],
)
def test_server_errors_and_broken_bodies_are_transient(text: str, expected: str) -> None:
    # the engine recognises throttling by "HTTP 429"/"HTTP 503" in the message
    err = translate_error(GenericError(text), "az://c/k")
    assert type(err) is TransientError and expected in str(err)


def _tree_sha256(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".spotstart" not in p.parts
    }


def test_fetch_of_a_prefix_is_byte_identical_and_cached_the_second_time(
    azurite: Azurite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use_key(monkeypatch)
    config = FetchConfig(endpoint=azurite.endpoint, chunk_bytes=1 * MiB)
    report = spotstart.fetch(f"az://{CONTAINER}/llama/", tmp_path, config)
    want = {
        key.removeprefix("llama/"): hashlib.sha256(data).hexdigest()
        for key, data in BLOBS.items()
        if key.startswith("llama/")
    }
    assert {k: v for k, v in _tree_sha256(tmp_path).items() if k in want} == want
    assert report.files_fetched == 3
    again = spotstart.fetch(f"az://{CONTAINER}/llama/", tmp_path, config)
    assert again.files_cached == 3 and again.bytes_transferred == 0
