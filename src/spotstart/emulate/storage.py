"""The emulated cloud: S3 and GCS servers behind one link emulator, with an admin endpoint.

``python -m spotstart.emulate.storage --json`` runs it; `StorageEmulator` runs that process for
tests and benchmarks. Not a cloud: no IAM, no real credentials, loopback only.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import http.client
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, cast

from spotstart.emulate.link import FaultRule, LinkConfig, rules_from_json, rules_to_json
from spotstart.emulate.proxy import LinkEmulator, TcpProxy, stats_snapshot
from spotstart.emulate.servers import (
    EmulatorError,
    FakeGcs,
    FakeGcsPorts,
    SeaweedS3,
    free_port,
    poll_until,
)

REGION = "us-east-1"
# weed mini creates this identity at start and then refuses other keys and unsigned requests
ACCESS_KEY_ID = "spotstart"
SECRET_ACCESS_KEY = "spotstart-secret"
DEFAULT_BUCKET = "spotstart-test"
# Above this, objects go to GCS through the preload dir: fake-gcs holds API uploads in memory
# (about 2x their size) while writing them.
GCS_API_UPLOAD_MAX_BYTES = 64 * 1024 * 1024
_IO_BLOCK = 1024 * 1024


@dataclass(frozen=True)
class StorageEmulatorOptions:
    """What to start. ``data_dir`` None = a fresh temporary directory (removed at exit)."""

    data_dir: Path | None = None
    link: LinkConfig = field(default_factory=LinkConfig)
    buckets: tuple[str, ...] = (DEFAULT_BUCKET,)
    gcs_preload_dir: Path | None = None
    host: str = "127.0.0.1"
    ready_timeout_s: float = 120.0

    def to_argv(self) -> list[str]:
        argv: list[str] = []
        if self.data_dir is not None:
            argv += ["--data-dir", str(self.data_dir)]
        link = self.link
        argv += [
            "--per-conn-mbps",
            "0" if link.per_conn_bytes_per_s is None else f"{link.per_conn_bytes_per_s / 1e6:g}",
            "--aggregate-mbps",
            "0" if link.aggregate_bytes_per_s is None else f"{link.aggregate_bytes_per_s / 1e6:g}",
            "--latency-ms",
            f"{link.first_byte_latency_s * 1000:g}",
            "--host",
            self.host,
        ]
        for bucket in self.buckets:
            argv += ["--bucket", bucket]
        if self.gcs_preload_dir is not None:
            argv += ["--gcs-preload", str(self.gcs_preload_dir)]
        return argv


# --------------------------------------------------------------------------------------------
# The long-running process
# --------------------------------------------------------------------------------------------


class EmulatedCloud:
    """S3 + GCS servers, the link emulator in front of them and the admin endpoint (in-process)."""

    def __init__(
        self,
        data_dir: Path,
        link: LinkConfig,
        buckets: tuple[str, ...],
        gcs_preload_dir: Path | None,
        host: str = "127.0.0.1",
    ) -> None:
        self.data_dir = data_dir
        self.host = host
        self.buckets = buckets
        self.link = LinkEmulator(link)
        self.s3 = SeaweedS3(
            data_dir / "s3",
            buckets,
            host,
            env_extra={
                "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
                "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
            },
        )
        self.gcs_preload_dir = gcs_preload_dir or data_dir / "gcs-preload"
        self.gcs: FakeGcs | None = None
        self.proxies: dict[str, TcpProxy] = {}
        self._admin: ThreadingHTTPServer | None = None
        self._gcs_lock = threading.Lock()

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.s3.start()
        self.proxies["s3"] = self.link.open_proxy(
            (self.host, self.s3.port), http=True, flavor="s3", listen_host=self.host
        )
        # the GCS proxies exist before fake-gcs starts: its public host is the proxy address
        gcs = FakeGcs(self.data_dir / "gcs-root", self.gcs_preload_dir, host=self.host)
        self.gcs = gcs
        gcs.ports = FakeGcsPorts(free_port(self.host), free_port(self.host))
        self.proxies["gcs"] = self.link.open_proxy(
            (self.host, gcs.ports.http), http=True, flavor="gcs", listen_host=self.host
        )
        self.proxies["gcs_https"] = self.link.open_proxy(
            (self.host, gcs.ports.https), http=False, flavor="gcs", listen_host=self.host
        )
        gcs.public_host = f"{self.host}:{self.proxies['gcs'].port}"
        gcs.start()
        for bucket in self.buckets:
            self._create_gcs_bucket(bucket)
            self._create_s3_bucket(bucket)
        self._start_admin()

    def _create_s3_bucket(self, bucket: str) -> None:
        # weed answers on its S3 port a moment before its identities are loaded
        last: list[str] = []

        def created() -> bool:
            try:
                _s3_request(self.s3.endpoint, "PUT", f"/{bucket}", ok=(200, 409))
            except EmulatorError as exc:
                last[:] = [str(exc)]
                return False
            return True

        poll_until(
            created,
            timeout_s=30,
            what=f"creating S3 bucket {bucket} ({' '.join(last)})",
            alive=self.s3.died,
            interval_s=0.2,
        )

    def failure(self) -> str | None:
        """Why a server died, or None; a GCS reload in progress is not a failure."""
        died = self.s3.died()
        if died is None and self.gcs is not None and self._gcs_lock.acquire(blocking=False):
            try:
                died = self.gcs.died()
            finally:
                self._gcs_lock.release()
        return died

    def _create_gcs_bucket(self, bucket: str) -> None:
        assert self.gcs is not None
        body = json.dumps({"name": bucket}).encode()
        status, text = _http(
            "POST",
            self.gcs.endpoint + "/storage/v1/b?project=test",
            body,
            {"Content-Type": "application/json"},
        )
        if status not in (200, 409):
            raise EmulatorError(f"creating GCS bucket {bucket}: HTTP {status}: {text[:300]}")

    def reload_gcs(self) -> None:
        """Restart fake-gcs on the same ports so files new in the preload dir appear."""
        with self._gcs_lock:
            assert self.gcs is not None
            self.gcs.restart()

    def ready_info(self) -> dict[str, Any]:
        assert self.gcs is not None and self._admin is not None
        host = self.host
        via = {name: f"http://{host}:{proxy.port}" for name, proxy in self.proxies.items()}
        return {
            "s3": {
                "endpoint": via["s3"],
                "direct": self.s3.endpoint,
                "region": REGION,
                "access_key_id": ACCESS_KEY_ID,
                "secret_access_key": SECRET_ACCESS_KEY,
            },
            "gcs": {
                "endpoint": via["gcs"],
                "direct": self.gcs.endpoint,
                "https_endpoint": f"https://{host}:{self.proxies['gcs_https'].port}",
                "https_direct": self.gcs.https_endpoint,
                "preload_dir": str(self.gcs_preload_dir),
            },
            "http_base": via["gcs"],
            "admin": f"http://{host}:{self._admin.server_address[1]}",
            "link": self.link.config.to_dict(),
            "buckets": list(self.buckets),
            "data_dir": str(self.data_dir),
        }

    def _start_admin(self) -> None:
        cloud = self

        class Handler(_AdminHandler):
            emulated = cloud

        self._admin = ThreadingHTTPServer((self.host, 0), Handler)
        self._admin.daemon_threads = True
        threading.Thread(target=self._admin.serve_forever, name="admin", daemon=True).start()

    def stop(self) -> None:
        if self._admin is not None:
            self._admin.shutdown()
            self._admin.server_close()
            self._admin = None
        self.link.close()
        if self.gcs is not None:
            self.gcs.stop()
        self.s3.stop()


class _AdminHandler(BaseHTTPRequestHandler):
    emulated: EmulatedCloud
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int, payload: Any) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self, method: str) -> None:
        cloud = self.emulated
        path = self.path.split("?", 1)[0].rstrip("/")
        body = self._body()
        try:
            if method == "GET" and path == "/stats":
                self._reply(200, stats_snapshot(cloud.link))
            elif method == "POST" and path == "/stats/reset":
                cloud.link.stats.reset()
                self._reply(200, {"ok": True})
            elif method == "PUT" and path == "/faults":
                rules = rules_from_json(body or b"[]")
                cloud.link.set_faults(rules)
                self._reply(200, {"ok": True, "rules": len(rules)})
            elif method == "DELETE" and path == "/faults":
                cloud.link.faults.clear()
                self._reply(200, {"ok": True})
            elif method == "GET" and path == "/faults":
                self._reply(200, stats_snapshot(cloud.link)["faults_remaining"])
            elif method == "PUT" and path == "/link":
                # fields left out keep their current values
                changes = json.loads(body or b"{}")
                if not isinstance(changes, dict):
                    raise ValueError("PUT /link takes a JSON object")
                config = LinkConfig.from_dict(cloud.link.config.to_dict() | changes)
                cloud.link.set_config(config)
                self._reply(200, config.to_dict())
            elif method == "GET" and path == "/link":
                self._reply(200, cloud.link.config.to_dict())
            elif method == "POST" and path == "/gcs/reload":
                cloud.reload_gcs()
                self._reply(200, {"ok": True})
            elif method == "GET" and path == "/ready":
                self._reply(200, cloud.ready_info())
            else:
                self._reply(404, {"error": f"no route {method} {path}"})
        except (ValueError, TypeError) as exc:
            self._reply(400, {"error": str(exc)})
        except EmulatorError as exc:
            self._reply(500, {"error": str(exc)})

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spotstart emulate storage",
        description="Run local S3 and GCS servers behind an emulated network link.",
    )
    parser.add_argument("--data-dir", type=Path, help="where servers keep data (default: temp)")
    parser.add_argument(
        "--per-conn-mbps", type=float, default=50.0, help="MB/s per connection, 0 = uncapped"
    )
    parser.add_argument(
        "--aggregate-mbps", type=float, default=0.0, help="MB/s for all connections, 0 = uncapped"
    )
    parser.add_argument("--latency-ms", type=float, default=30.0, help="first-byte latency")
    parser.add_argument(
        "--bucket", action="append", default=None, help="bucket on S3 and GCS (repeatable)"
    )
    parser.add_argument("--gcs-preload", type=Path, help="DIR/<bucket>/<object> loaded into GCS")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--json", action="store_true", help="print one JSON line when ready")
    parser.add_argument(
        "--exit-on-stdin-eof",
        action="store_true",
        help="stop when stdin closes (used by StorageEmulator so a dead parent leaves no servers)",
    )
    return parser


def _human_summary(info: Mapping[str, Any]) -> str:
    s3, gcs = info["s3"], info["gcs"]
    env = env_for_s3(info) | env_for_gcs(info)
    lines = [
        "spotstart emulated cloud is up (Ctrl-C to stop)",
        f"  S3   via link {s3['endpoint']}   direct {s3['direct']}",
        f"  GCS  via link {gcs['endpoint']}   direct {gcs['direct']}",
        f"  GCS  https    {gcs['https_endpoint']}   (self-signed)",
        f"  HTTP base     {info['http_base']}/<bucket>/<key>",
        f"  admin         {info['admin']}  (GET /stats, PUT /faults, PUT /link, ...)",
        f"  buckets       {', '.join(info['buckets'])}",
        f"  data dir      {info['data_dir']}",
        "",
        "export these to point tools at it:",
    ]
    lines += [f"  export {key}={value}" for key, value in env.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the emulated cloud until SIGINT/SIGTERM; 0 on a clean stop, 1 if a server failed.

    Example::

        python -m spotstart.emulate.storage --json --per-conn-mbps 50 --bucket models
    """
    args = _build_parser().parse_args(argv)
    link = LinkConfig(
        per_conn_bytes_per_s=args.per_conn_mbps * 1e6 if args.per_conn_mbps > 0 else None,
        first_byte_latency_s=args.latency_ms / 1000.0,
        aggregate_bytes_per_s=args.aggregate_mbps * 1e6 if args.aggregate_mbps > 0 else None,
    )
    temp_dir: str | None = None
    if args.data_dir is None:
        temp_dir = tempfile.mkdtemp(prefix="spotstart-emulate-")
        data_dir = Path(temp_dir)
    else:
        data_dir = cast(Path, args.data_dir).resolve()
    buckets = tuple(args.bucket or [DEFAULT_BUCKET])
    cloud = EmulatedCloud(data_dir, link, buckets, args.gcs_preload, args.host)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    atexit.register(cloud.stop)
    try:
        cloud.start()
    except EmulatorError as exc:
        print(f"spotstart emulate storage: {exc}", file=sys.stderr)
        return 1
    try:
        info = cloud.ready_info()
        print(json.dumps(info) if args.json else _human_summary(info), flush=True)
        if args.exit_on_stdin_eof:

            def watch_stdin() -> None:
                with contextlib.suppress(OSError, ValueError):
                    while sys.stdin.buffer.read(4096):
                        pass
                stop.set()

            threading.Thread(target=watch_stdin, name="stdin-watch", daemon=True).start()
        while not stop.wait(0.5):
            died = cloud.failure()
            if died is not None:
                print(f"spotstart emulate storage: {died}", file=sys.stderr)
                return 1
        return 0
    finally:
        cloud.stop()
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Small HTTP helpers (stdlib + botocore signing)
# --------------------------------------------------------------------------------------------


def _http(
    method: str,
    url: str,
    body: bytes | IO[bytes] | None = None,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 300.0,
) -> tuple[int, str]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(
        parts.hostname or "127.0.0.1", parts.port, timeout=timeout_s, blocksize=_IO_BLOCK
    )
    try:
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request(method, target or "/", body=body, headers=dict(headers or {}))
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        conn.close()


def s3_signed_headers(
    method: str,
    url: str,
    headers: Mapping[str, str] | None = None,
    *,
    access_key_id: str = ACCESS_KEY_ID,
    secret_access_key: str = SECRET_ACCESS_KEY,
    region: str = REGION,
) -> dict[str, str]:
    """Headers that SigV4-sign ``method url`` with an unsigned payload (bodies are streamed)."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    class UnsignedPayloadAuth(SigV4Auth):  # type: ignore[misc]
        def payload(self, request: Any) -> str:
            return "UNSIGNED-PAYLOAD"

    request = AWSRequest(method=method, url=url, headers=dict(headers or {}))
    request.headers["x-amz-content-sha256"] = "UNSIGNED-PAYLOAD"
    UnsignedPayloadAuth(Credentials(access_key_id, secret_access_key), "s3", region).add_auth(
        request
    )
    return {key: str(value) for key, value in request.headers.items()}


def _s3_request(
    endpoint: str,
    method: str,
    path: str,
    body: bytes | IO[bytes] | None = None,
    length: int | None = None,
    ok: tuple[int, ...] = (200,),
) -> str:
    url = endpoint + path
    extra = {} if length is None else {"Content-Length": str(length)}
    headers = s3_signed_headers(method, url, extra)
    status, text = _http(method, url, body, headers)
    if status not in ok:
        raise EmulatorError(f"S3 {method} {path}: HTTP {status}: {text[:300]}")
    return text


def env_for_s3(info: Mapping[str, Any]) -> dict[str, str]:
    s3 = info["s3"]
    return {
        "AWS_ENDPOINT_URL": s3["endpoint"],
        "AWS_ENDPOINT_URL_S3": s3["endpoint"],
        "AWS_ACCESS_KEY_ID": s3["access_key_id"],
        "AWS_SECRET_ACCESS_KEY": s3["secret_access_key"],
        "AWS_REGION": s3["region"],
        "AWS_DEFAULT_REGION": s3["region"],
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def env_for_gcs(info: Mapping[str, Any]) -> dict[str, str]:
    gcs = info["gcs"]
    return {
        "STORAGE_EMULATOR_HOST": gcs["endpoint"],
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": gcs["endpoint"],
        "CLOUDSDK_API_ENDPOINT_OVERRIDES_STORAGE": gcs["endpoint"] + "/",
        "CLOUDSDK_AUTH_DISABLE_CREDENTIALS": "true",
        "CLOUDSDK_CORE_PROJECT": "test",
        "GOOGLE_CLOUD_PROJECT": "test",
    }


# --------------------------------------------------------------------------------------------
# The handle for tests and benchmarks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Endpoints:
    endpoint: str
    direct: str
    region: str
    access_key_id: str
    secret_access_key: str


@dataclass(frozen=True)
class GcsEndpoints:
    endpoint: str
    direct: str
    https_endpoint: str
    https_direct: str
    preload_dir: Path


ObjectSource = bytes | Path


class StorageEmulator:
    """The emulated cloud in its own process, so the relay never shares our GIL.

    Example::

        with StorageEmulator(StorageEmulatorOptions(buckets=("models",))) as cloud:
            cloud.seed_s3("models", {"m.safetensors": Path("m.safetensors")})
            cloud.set_faults([FaultRule(kind="reset", after_bytes=1 << 20)])
            run_tool(env=cloud.env_for_s3())
            print(cloud.stats()["body_bytes_down"])
    """

    def __init__(self, options: StorageEmulatorOptions | None = None) -> None:
        self.options = options or StorageEmulatorOptions()
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr_path: Path | None = None
        self._info: dict[str, Any] | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> StorageEmulator:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        stderr_file = tempfile.NamedTemporaryFile(  # noqa: SIM115 (kept for error reports)
            prefix="spotstart-emulate-", suffix=".stderr", delete=False
        )
        self._stderr_path = Path(stderr_file.name)
        # -P: not a `spotstart/` of the working directory (sys.path[0] of `python -m`)
        argv = [sys.executable, "-P", "-m", "spotstart.emulate.storage"]
        argv += ["--json", "--exit-on-stdin-eof"]
        self._proc = subprocess.Popen(
            argv + self.options.to_argv(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr_file,
        )
        stderr_file.close()
        lines: list[bytes] = []
        proc = self._proc
        assert proc.stdout is not None
        stdout = proc.stdout

        def read_ready_line() -> None:
            lines.append(stdout.readline())

        reader = threading.Thread(target=read_ready_line, daemon=True)
        reader.start()
        try:
            poll_until(
                lambda: bool(lines),
                timeout_s=self.options.ready_timeout_s,
                what="spotstart emulate storage",
                alive=lambda: None if proc.poll() is None else self._stderr_tail(),
            )
            if not lines[0].strip():
                raise EmulatorError(f"spotstart emulate storage: {self._stderr_tail()}")
            self._info = json.loads(lines[0])
        except BaseException:
            self.stop()
            raise

    def _stderr_tail(self) -> str:
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(2)
        text = ""
        if self._stderr_path is not None:
            with contextlib.suppress(OSError):
                text = self._stderr_path.read_text("utf-8", "replace")[-3000:]
        code = None if self._proc is None else self._proc.poll()
        return f"exited with {code}; stderr:\n{text}"

    def stop(self, timeout_s: float = 15.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout_s)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        if self._stderr_path is not None:
            self._stderr_path.unlink(missing_ok=True)
            self._stderr_path = None

    @property
    def pid(self) -> int:
        assert self._proc is not None, "StorageEmulator not started"
        return self._proc.pid

    # -- endpoints -----------------------------------------------------------------------------
    @property
    def info(self) -> dict[str, Any]:
        """The ready JSON of the emulator process."""
        if self._info is None:
            raise EmulatorError("StorageEmulator not started; use it as a context manager")
        return self._info

    @property
    def s3(self) -> S3Endpoints:
        s3 = self.info["s3"]
        return S3Endpoints(
            s3["endpoint"], s3["direct"], s3["region"], s3["access_key_id"], s3["secret_access_key"]
        )

    @property
    def gcs(self) -> GcsEndpoints:
        gcs = self.info["gcs"]
        return GcsEndpoints(
            gcs["endpoint"],
            gcs["direct"],
            gcs["https_endpoint"],
            gcs["https_direct"],
            Path(gcs["preload_dir"]),
        )

    @property
    def http_base(self) -> str:
        return str(self.info["http_base"])

    @property
    def admin(self) -> str:
        return str(self.info["admin"])

    @property
    def data_dir(self) -> Path:
        return Path(self.info["data_dir"])

    def env_for_s3(self) -> dict[str, str]:
        return env_for_s3(self.info)

    def env_for_gcs(self) -> dict[str, str]:
        return env_for_gcs(self.info)

    # -- admin ---------------------------------------------------------------------------------
    def _admin_call(self, method: str, path: str, body: bytes | None = None) -> Any:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        status, text = _http(method, self.admin + path, body, headers, timeout_s=600)
        if status != 200:
            raise EmulatorError(f"emulator admin {method} {path}: HTTP {status}: {text[:300]}")
        return json.loads(text)

    def stats(self) -> dict[str, Any]:
        return cast(dict[str, Any], self._admin_call("GET", "/stats"))

    def reset_stats(self) -> None:
        self._admin_call("POST", "/stats/reset")

    def set_faults(self, rules: list[FaultRule]) -> None:
        self._admin_call("PUT", "/faults", rules_to_json(rules).encode())

    def clear_faults(self) -> None:
        self._admin_call("DELETE", "/faults")

    def set_link(self, link: LinkConfig) -> None:
        self._admin_call("PUT", "/link", json.dumps(link.to_dict()).encode())

    def reload_gcs(self) -> None:
        self._admin_call("POST", "/gcs/reload")

    # -- seeding -------------------------------------------------------------------------------
    def seed_s3(self, bucket: str, objects: Mapping[str, ObjectSource]) -> None:
        """PUT each object to the direct S3 endpoint (files are streamed, not read whole)."""
        for key, source in objects.items():
            path = "/" + bucket + "/" + urllib.parse.quote(key, safe="/~")
            if isinstance(source, bytes):
                _s3_request(self.s3.direct, "PUT", path, source, len(source))
            else:
                with open(source, "rb") as f:
                    _s3_request(self.s3.direct, "PUT", path, f, source.stat().st_size)

    def seed_gcs(self, bucket: str, objects: Mapping[str, ObjectSource]) -> None:
        """Small objects through the JSON API; large ones via the preload dir and one reload."""
        reload_needed = False
        for key, source in objects.items():
            size = len(source) if isinstance(source, bytes) else source.stat().st_size
            if size > GCS_API_UPLOAD_MAX_BYTES:
                target = self.gcs.preload_dir / bucket / key
                target.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(source, bytes):
                    target.write_bytes(source)
                else:
                    shutil.copyfile(source, target)
                reload_needed = True
                continue
            url = (
                f"{self.gcs.direct}/upload/storage/v1/b/{urllib.parse.quote(bucket, safe='')}/o"
                f"?uploadType=media&name={urllib.parse.quote(key, safe='')}"
            )
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
            if isinstance(source, bytes):
                status, text = _http("POST", url, source, headers)
            else:
                with open(source, "rb") as f:
                    status, text = _http("POST", url, f, headers)
            if status != 200:
                raise EmulatorError(f"GCS upload gs://{bucket}/{key}: HTTP {status}: {text[:300]}")
        if reload_needed:
            self.reload_gcs()


def wait_for_exit(pid: int, timeout_s: float) -> bool:
    """True once process ``pid`` is gone (polling with a deadline)."""
    import os

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


if __name__ == "__main__":
    sys.exit(main())
