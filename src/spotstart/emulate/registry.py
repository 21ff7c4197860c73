"""A real OCI registry on 127.0.0.1 (Debian's `docker-registry`, distribution 2.8) for tests,
benchmarks and demos, anonymous or behind bearer-token auth. The token service is ours (no
Debian package ships one): it follows the Docker token spec (GET realm?service&scope with
Basic credentials -> ``{"token": JWT}``, ES256 signed, the signing certificate in ``x5c``),
which is what the registry verifies against its ``rootcertbundle``."""

from __future__ import annotations

import base64
import datetime
import json
import shutil
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from spotstart.emulate.servers import EmulatorError, LocalServer, free_port

SERVICE = "spotstart-registry"
ISSUER = "spotstart-token-service"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenService:
    """``users``: name -> password allowed to pull; anonymous requests get a token without
    access (the registry then answers 401, as Docker Hub does for private repositories)."""

    def __init__(self, data_dir: Path, users: dict[str, str], host: str = "127.0.0.1") -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.users = users
        self.host = host
        self.requests: list[dict[str, str]] = []
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUER)])
        now = datetime.datetime.now(datetime.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        data_dir.mkdir(parents=True, exist_ok=True)
        self.cert_path = data_dir / "token-cert.pem"
        self.cert_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        self._der = self._cert.public_bytes(serialization.Encoding.DER)
        self._server: ThreadingHTTPServer | None = None
        self.port = 0

    @property
    def realm(self) -> str:
        return f"http://{self.host}:{self.port}/token"

    def token(self, subject: str, scopes: list[str]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind == "repository" and subject:
                granted = [a for a in actions.split(",") if a in ("pull", "push")]
                access.append({"type": kind, "name": name, "actions": granted})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(self._der).decode()]}
        claims = {
            "iss": ISSUER,
            "sub": subject,
            "aud": SERVICE,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signing = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        der = self._key.sign(signing.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return f"{signing}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def start(self) -> None:
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlsplit(self.path)
                query = parse_qs(url.query)
                auth = self.headers.get("Authorization", "")
                service.requests.append({"path": url.path, "authorization": auth})
                subject = ""
                if auth.startswith("Basic "):
                    user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
                    if service.users.get(user) != password:
                        self._answer(401, {"details": "incorrect username or password"})
                        return
                    subject = user
                token = service.token(subject, query.get("scope", []))
                self._answer(200, {"token": token, "expires_in": 300})

            def _answer(self, status: int, doc: dict[str, object]) -> None:
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.port = free_port(self.host)
        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class DockerRegistry(LocalServer):
    """`docker-registry serve` with its own config: filesystem storage under ``data_dir``,
    listening on 127.0.0.1; with ``token`` given, bearer-token auth against it."""

    name = "docker-registry"

    def __init__(self, data_dir: Path, token: TokenService | None = None) -> None:
        super().__init__(data_dir)
        self.token = token

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> None:
        binary = shutil.which("docker-registry") or shutil.which("registry")
        if binary is None:
            raise EmulatorError(
                "docker-registry is not installed (apt-get install docker-registry)"
            )
        self.port = free_port(self.host)
        storage = self.data_dir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        auth = ""
        if self.token is not None:
            self.token.start()
            auth = (
                "auth:\n  token:\n"
                f"    realm: {self.token.realm}\n    service: {SERVICE}\n"
                f"    issuer: {ISSUER}\n    rootcertbundle: {self.token.cert_path}\n"
            )
        config = (
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.address}\n{auth}"
        )
        (self.data_dir / "config.yml").write_text(config)
        self._launch([binary, "serve", str(self.data_dir / "config.yml")], "/v2/", timeout_s)

    def stop(self) -> None:
        super().stop()
        if self.token is not None:
            self.token.stop()
