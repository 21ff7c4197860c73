"""Red team of ``--load-format spotstart``'s settings and config check (no vLLM needed).

Attackers: whoever writes ``--model-loader-extra-config`` (the operator, but often a template
filled from a ConfigMap or a user's form), and whoever answers for the source (a bucket or an
http server the operator trusts less than the node). Each test names what it would make us do."""

from __future__ import annotations

import http.server
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from spotstart.errors import SpotstartError, TransientError, UsageError
from spotstart.integrations import vllm as plugin
from spotstart.integrations.vllm import LoaderSettings, check_config, redact, summary
from spotstart.untrusted_json import JSONRejected

SECRET = "SECRETSIGNATURE0123456789"
CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 256}


def parse(**extra: object) -> LoaderSettings:
    return LoaderSettings.parse({"source": "gs://models/tiny/", **extra})


# -- the extra-config JSON --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("window_bytes", 0),
        ("window_bytes", -1),
        ("window_bytes", float("nan")),
        ("window_bytes", 1e9),
        ("window_bytes", True),
        ("window_bytes", "512MiB"),
        ("concurrency", float("inf")),
        ("concurrency", False),
        ("concurrency", 10**9),  # a template's typo: 10**9 connections and descriptors
        ("anonymous", "false"),  # a string "false" must not read as true
        ("check_config", 0),
        ("peers", [1, 2]),
        ("peers", {"a": "b"}),
        ("cache_dir", ""),
        ("cache_dir", "relative/cache"),  # would land in vLLM's working directory
        ("verify", "full"),
        ("verify", None),
    ],
)
def test_wrong_types_and_absurd_values_are_refused_naming_the_key(key: str, value: object) -> None:
    with pytest.raises(UsageError, match=repr(key) if key != "verify" else "verify"):
        parse(**{key: value})


def test_largest_accepted_values_do_not_break_parsing() -> None:
    s = parse(concurrency=plugin.MAX_CONCURRENCY, window_bytes=2**62)
    assert s.concurrency == plugin.MAX_CONCURRENCY and s.window_bytes == 2**62


@pytest.mark.parametrize(
    "endpoint", [f"https://AKIA:{SECRET}@minio.local:9000", f"https://minio.local/?sig={SECRET}"]
)
def test_an_endpoint_with_credentials_is_refused_without_echoing_them(endpoint: str) -> None:
    with pytest.raises(UsageError) as err:
        parse(endpoint=endpoint)
    assert SECRET not in str(err.value)


def test_a_fifo_token_file_fails_at_once_not_hangs(tmp_path: Path) -> None:
    fifo = tmp_path / "token"
    os.mkfifo(fifo, 0o600)
    s = parse(peers=["10.0.0.7:8470"], peer_token_file=str(fifo))
    t0 = time.monotonic()
    with pytest.raises(UsageError, match="not a regular file"):
        s.fetch_config()
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize(
    ("mode", "content", "needle"),
    [
        (0o644, "a" * 32, "other users"),
        (0o600, "short", "bytes"),
        (0o600, "a" * 5000, "bytes"),
        (0o600, "tok en with spaces ok?", "spaces"),
    ],
)
def test_token_file_rules_and_the_token_never_echoed(
    tmp_path: Path, mode: int, content: str, needle: str
) -> None:
    path = tmp_path / "token"
    path.write_text(content)
    path.chmod(mode)
    with pytest.raises(UsageError, match=needle) as err:
        parse(peers=["10.0.0.7:8470"], peer_token_file=str(path)).fetch_config()
    assert content not in str(err.value)


# -- what the loader logs -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "url",
    [
        f"https://h.example/m/model.safetensors?X-Amz-Signature={SECRET}&X-Amz-Credential=a",
        f"https://acct.blob.core.windows.net/c/m.safetensors?sv=2024&sig={SECRET}",
        f"https://user:{SECRET}@h.example/m/model.safetensors",
    ],
)
def test_the_summary_line_never_carries_a_signature_or_password(url: str) -> None:
    report = SimpleNamespace(
        tensors=3,
        bytes_total=10**6,
        source=url,
        bytes_from_peers=0,
        bytes_from_cache=0,
        verified={"size": 1},
    )
    line = summary(report, 1000, 0.5)
    assert SECRET not in line
    assert "h.example" in line or "windows.net" in line
    assert redact("gs://models/tiny/") == "gs://models/tiny/"


# -- the source's config.json -----------------------------------------------------------------
class _Origin(http.server.BaseHTTPRequestHandler):
    """An http origin whose config.json is whatever the test says, optionally dripped."""

    body = b""
    drip_s = 0.0
    seen: list[str] = []

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self.seen.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def do_GET(self) -> None:
        self.seen.append(self.path)
        body = self.body
        rng = self.headers.get("Range")
        if rng:
            lo, hi = rng.split("=", 1)[1].split("-")
            body = body[int(lo) : int(hi) + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {lo}-{hi}/{len(self.body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            if self.drip_s:
                for i in range(len(body)):
                    self.wfile.write(body[i : i + 1])
                    self.wfile.flush()
                    time.sleep(self.drip_s)
            else:
                self.wfile.write(body)
        except OSError:
            pass


@pytest.fixture
def origin() -> Iterator[tuple[str, type[_Origin]]]:
    handler = type("Origin", (_Origin,), {"body": b"", "drip_s": 0.0, "seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def model_dir(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    return tmp_path


def test_a_config_that_drips_is_bounded_in_time(
    origin: tuple[str, type[_Origin]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow source (one byte every 0.3 s, under every stall timeout) would hold vLLM's start
    for ~60 s per 200 bytes, for ever on a large body: the whole read has a deadline."""
    url, handler = origin
    handler.body = json.dumps(CONFIG).encode() + b" " * 4000
    handler.drip_s = 0.3
    monkeypatch.setattr(plugin, "CONFIG_TIMEOUT_S", 1.5)
    s = LoaderSettings.parse({"source": f"{url}/m/model.safetensors"})
    t0 = time.monotonic()
    with pytest.raises(TransientError, match="not read within"):
        check_config(s, str(model_dir(tmp_path)))
    assert time.monotonic() - t0 < 10
    assert not [t for t in threading.enumerate() if t.name.startswith("spotstart-config")]


def test_a_huge_config_is_refused_by_its_size(
    origin: tuple[str, type[_Origin]], tmp_path: Path
) -> None:
    url, handler = origin
    handler.body = b" " * (plugin.MAX_CONFIG_BYTES + 1)
    s = LoaderSettings.parse({"source": f"{url}/m/model.safetensors"})
    with pytest.raises(UsageError, match="not a model config"):
        check_config(s, str(model_dir(tmp_path)))
    assert not [p for p in handler.seen if p.endswith("config.json") and "GET" in p]


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe garbage", b"[" * 10000, b"NaN"])
def test_garbage_config_is_a_clear_error(
    origin: tuple[str, type[_Origin]], tmp_path: Path, body: bytes
) -> None:
    url, handler = origin
    handler.body = body
    s = LoaderSettings.parse({"source": f"{url}/m/"})
    with pytest.raises((SpotstartError, JSONRejected), match=r"config\.json"):
        check_config(s, str(model_dir(tmp_path)))


def test_a_different_config_fails_and_the_message_has_no_secret(
    origin: tuple[str, type[_Origin]], tmp_path: Path
) -> None:
    url, handler = origin
    handler.body = json.dumps({**CONFIG, "hidden_size": 512}).encode()
    s = LoaderSettings.parse({"source": f"{url.replace('//', f'//u:{SECRET}@')}/m/"})
    with pytest.raises(UsageError, match="differs") as err:
        check_config(s, str(model_dir(tmp_path)))
    assert SECRET not in str(err.value)


def test_a_signed_source_is_not_compared_and_its_signature_not_shown(
    origin: tuple[str, type[_Origin]], tmp_path: Path
) -> None:
    """Before: config.json was asked for at '...safetensors?X-Amz-Signature=.../config.json'
    (the signature pasted into the path), which fails the start on a real store."""
    url, handler = origin
    handler.body = json.dumps(CONFIG).encode()
    s = LoaderSettings.parse({"source": f"{url}/m/model.safetensors?X-Amz-Signature={SECRET}"})
    said = check_config(s, str(model_dir(tmp_path)))
    assert "signed URL" in said and SECRET not in said
    assert not any(SECRET in p for p in handler.seen)
    assert s.config_url() == f"{url}/m/config.json"


# -- errors raised while streaming, as vLLM logs them -----------------------------------------
def test_a_stream_error_keeps_its_type_and_loses_the_signature(tmp_path: Path) -> None:
    """A presigned source whose origin fails mid-stream: the store's error names the URL with
    its signature (a credential, good until it expires); vLLM logs that traceback. The loader
    re-raises it scrubbed."""
    torch = pytest.importorskip("torch")
    from spotstart.errors import RetriesExceeded
    from spotstart.weights.stream import iter_tensors
    from tests.weights.test_stream_redteam import FAST_FAIL, _Origin, checkpoint

    checkpoint(tmp_path / "m.safetensors")
    handler = type("Origin", (_Origin,), {"body": (tmp_path / "m.safetensors").read_bytes()})
    handler.mode = "short"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/m.safetensors?X-Amz-Signature={SECRET}"
    try:
        with (
            pytest.raises(RetriesExceeded) as raw,
            iter_tensors(url, config=FAST_FAIL, window_bytes=1 << 20) as stream,
        ):
            list(stream)
        assert SECRET in str(raw.value)  # what the stream itself says: the leak
        with (
            pytest.raises(RetriesExceeded) as err,
            plugin.errors_scrubbed(),
            iter_tensors(url, config=FAST_FAIL, window_bytes=1 << 20) as stream,
        ):
            list(stream)
    finally:
        server.shutdown()
        server.server_close()
    assert SECRET not in str(err.value) and "?<redacted>" in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__
    del torch


def test_scrub_leaves_plain_urls_alone_and_strips_every_secret() -> None:
    text = f"gs://models/tiny/ then https://u:{SECRET}@h/x?sig={SECRET} and s3://b/k"
    out = plugin.scrub(text)
    assert SECRET not in out and "gs://models/tiny/" in out and "s3://b/k" in out
    with pytest.raises(ValueError, match="plain") as err, plugin.errors_scrubbed():
        raise ValueError("plain message")
    assert err.value.__cause__ is None


def test_a_size_only_load_says_so_in_the_summary() -> None:
    report = SimpleNamespace(
        tensors=1,
        bytes_total=1,
        source="http://h/m.safetensors",
        bytes_from_peers=0,
        bytes_from_cache=0,
        verified={"size": 1},
    )
    assert "sizes only" in summary(report, 1, 1.0)
    report.verified = {"size": 1, "crc32c": 1}
    assert "sizes only" not in summary(report, 1, 1.0)


@pytest.mark.parametrize(
    "source",
    [
        f"ftp://u:{SECRET}@h.example/x?sig={SECRET}",
        f"gs://u:{SECRET}@bucket/x",
        f"https://h.example/m/?X-Amz-Signature={SECRET}&",
    ],
)
def test_a_malformed_source_is_refused_without_echoing_its_secrets(source: str) -> None:
    try:
        LoaderSettings.parse({"source": source})
    except UsageError as exc:
        assert SECRET not in str(exc)
