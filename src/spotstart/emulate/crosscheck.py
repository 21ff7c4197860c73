"""Second implementations of each protocol, to check spotstart against more than the servers it
was written with: moto (S3, SigV4 signatures enforced through its IAM), gcp-storage-emulator
(GCS JSON API) and nginx (plain http and https with Range, ETag, If-Range). Tests start them on
127.0.0.1; no link emulation here (see storage.py for that). Not for benchmarks: moto and
gcp-storage-emulator re-read whole objects per ranged request."""

from __future__ import annotations

import json
import os
import shutil
import sys
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from spotstart.emulate.servers import EmulatorError, LocalServer, free_port

REGION = "us-east-1"


class MotoS3(LocalServer):
    """``moto_server`` with authentication on: only the access key it issues at start (through
    its own IAM API, in the first unauthenticated requests moto allows) is accepted, and
    signatures are checked, as a real S3 endpoint does. Needs ``moto[server]``."""

    name = "moto_server"

    def __init__(self, data_dir: Path, buckets: tuple[str, ...], host: str = "127.0.0.1") -> None:
        super().__init__(data_dir, host)
        self.buckets = buckets
        self.access_key_id = ""
        self.secret_access_key = ""

    def start(self, timeout_s: float = 60.0) -> None:
        try:
            import boto3
            import moto.server  # noqa: F401
        except ImportError as exc:
            raise EmulatorError(f"moto[server] is not installed: {exc}") from exc
        self.port = free_port(self.host)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"  # the IAM calls below, then SigV4 only
        argv = [sys.executable, "-P", "-m", "moto.server", "-H", self.host, "-p", str(self.port)]
        self._launch(argv, "/moto-api/", timeout_s, env)
        boot = {"aws_access_key_id": "boot", "aws_secret_access_key": "boot"}
        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name=REGION, **boot)
        iam.create_user(UserName="spotstart")
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
        }
        iam.put_user_policy(
            UserName="spotstart", PolicyName="all", PolicyDocument=json.dumps(policy)
        )
        key = iam.create_access_key(UserName="spotstart")["AccessKey"]
        self.access_key_id, self.secret_access_key = key["AccessKeyId"], key["SecretAccessKey"]
        for bucket in self.buckets:
            self.client().create_bucket(Bucket=bucket)

    def client(self) -> Any:
        return _s3_client(self.endpoint, self.access_key_id, self.secret_access_key)

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_REGION": REGION,
        }

    def seed(self, bucket: str, objects: Mapping[str, bytes]) -> None:
        client = self.client()
        for key, data in objects.items():
            client.put_object(Bucket=bucket, Key=key, Body=data)


class S3rver(LocalServer):
    """npm ``s3rver`` (a third S3 implementation, in Node): checks SigV4 signatures for its one
    key pair (S3RVER/S3RVER) and writes its XML with its own namespace. ``binary``: its
    ``node_modules/.bin/s3rver`` (``npm install --prefix tests/node``)."""

    ACCESS_KEY_ID = SECRET_ACCESS_KEY = "S3RVER"
    name = "s3rver"

    def __init__(
        self, data_dir: Path, buckets: tuple[str, ...], binary: Path, host: str = "127.0.0.1"
    ) -> None:
        super().__init__(data_dir, host)
        self.buckets = buckets
        self.binary = binary

    def start(self, timeout_s: float = 60.0) -> None:
        if not self.binary.is_file():
            raise EmulatorError(f"{self.binary} missing: run npm ci --prefix tests/node")
        self.port = free_port(self.host)
        argv = [str(self.binary), "-d", str(self.data_dir / "data"), "-a", self.host]
        argv += ["-p", str(self.port), "--no-vhost-buckets", "-s"]
        for bucket in self.buckets:
            argv += ["--configure-bucket", bucket]
        self._launch(argv, "/", timeout_s)

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": self.SECRET_ACCESS_KEY,
            "AWS_REGION": REGION,
        }

    def seed(self, bucket: str, objects: Mapping[str, bytes]) -> None:
        client = _s3_client(self.endpoint, self.ACCESS_KEY_ID, self.SECRET_ACCESS_KEY)
        for key, data in objects.items():
            client.put_object(Bucket=bucket, Key=key, Body=data)


class GcsEmulator(LocalServer):
    """``gcp-storage-emulator`` (PyPI), in memory: a GCS JSON API written independently of
    fake-gcs-server."""

    name = "gcp-storage-emulator"

    def __init__(self, data_dir: Path, buckets: tuple[str, ...], host: str = "127.0.0.1") -> None:
        super().__init__(data_dir, host)
        self.buckets = buckets

    def start(self, timeout_s: float = 60.0) -> None:
        binary = Path(sys.executable).parent / "gcp-storage-emulator"
        found = str(binary) if binary.is_file() else shutil.which("gcp-storage-emulator")
        if found is None:
            raise EmulatorError("gcp-storage-emulator is not installed (pip install it)")
        self.port = free_port(self.host)
        argv = [found, "start", "--host", self.host, "--port", str(self.port), "--in-memory", "-q"]
        self._launch(argv, "/storage/v1/b", timeout_s)
        for bucket in self.buckets:
            self._call("POST", "/storage/v1/b?project=test", json.dumps({"name": bucket}).encode())

    def _call(self, method: str, path: str, body: bytes, ctype: str = "application/json") -> None:
        import http.client

        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": ctype})
            resp = conn.getresponse()
            text = resp.read()[:300].decode("utf-8", "replace")
        finally:
            conn.close()
        if resp.status not in (200, 409):
            raise EmulatorError(f"gcp-storage-emulator {method} {path}: HTTP {resp.status} {text}")

    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.endpoint}

    def seed(self, bucket: str, objects: Mapping[str, bytes]) -> None:
        for key, data in objects.items():
            b, k = urllib.parse.quote(bucket, safe=""), urllib.parse.quote(key, safe="")
            path = f"/upload/storage/v1/b/{b}/o?uploadType=media&name={k}"
            self._call("POST", path, data, "application/octet-stream")


class Nginx(LocalServer):
    """Debian's nginx serving ``root`` over http and https (a self-signed certificate made at
    start: point ``SSL_CERT_FILE`` at :attr:`cert_path`). Range, strong ETags and If-Range as
    nginx does them for static files."""

    name = "nginx"

    def __init__(self, data_dir: Path, host: str = "127.0.0.1") -> None:
        super().__init__(data_dir, host)
        self.root = data_dir / "www"
        self.tls_port = 0
        self.cert_path = data_dir / "cert.pem"

    @property
    def tls_endpoint(self) -> str:
        return f"https://{self.host}:{self.tls_port}"

    def start(self, timeout_s: float = 30.0) -> None:
        binary = shutil.which("nginx") or (
            "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
        )
        if binary is None:
            raise EmulatorError("nginx is not installed (apt-get install nginx-light)")
        self.root.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "tmp").mkdir(exist_ok=True)
        key_path = self.data_dir / "key.pem"
        _self_signed(self.cert_path, key_path, self.host)
        self.port, self.tls_port = free_port(self.host), free_port(self.host)
        d = self.data_dir
        user = "user root;\n" if os.geteuid() == 0 else ""
        temps = "".join(
            f"  {kind}_temp_path {d}/tmp/{kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        conf = (
            f"{user}daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\n"
            f"error_log {d}/error.log warn;\nevents {{ worker_connections 256; }}\n"
            f"http {{\n  access_log off;\n{temps}"
            f"  server {{ listen {self.host}:{self.port}; root {self.root}; }}\n"
            f"  server {{ listen {self.host}:{self.tls_port} ssl; root {self.root};\n"
            f"    ssl_certificate {self.cert_path}; ssl_certificate_key {key_path}; }}\n}}\n"
        )
        (d / "nginx.conf").write_text(conf)
        argv = [binary, "-c", str(d / "nginx.conf"), "-p", str(d), "-e", str(d / "error.log")]
        self._launch(argv, "/", timeout_s)

    def seed(self, objects: Mapping[str, bytes]) -> None:
        for key, data in objects.items():
            path = self.root / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)


def _s3_client(endpoint: str, key_id: str, secret: str) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
    )


def _self_signed(cert_path: Path, key_path: Path, host: str) -> None:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
