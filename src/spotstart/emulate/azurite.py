"""Azurite (Microsoft's Azure Storage emulator, from npm) serving Blob Storage on a free loopback
port, for tests and demos of ``az://`` sources. Installs Azurite once into a cache directory;
no telemetry, no network beyond 127.0.0.1 once installed. Not a production server."""

from __future__ import annotations

import base64
import email.utils
import hashlib
import hmac
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from spotstart.emulate.servers import EmulatorError, LocalServer, free_port

# Azurite's well-known development account (public, documented, accepted only by Azurite).
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
AZURITE_PACKAGE = "azurite@3"
_API_VERSION = "2021-08-06"


def azurite_dir() -> Path:
    """Where Azurite is installed: ``$SPOTSTART_AZURITE_DIR`` or ``~/.cache/spotstart/azurite``."""
    configured = os.environ.get("SPOTSTART_AZURITE_DIR")
    return Path(configured) if configured else Path.home() / ".cache/spotstart/azurite"


def find_azurite_blob(install: bool = True) -> Path:
    """The ``azurite-blob`` script, installing Azurite with npm into :func:`azurite_dir` first
    when it is missing and ``install`` is true."""
    if shutil.which("node") is None:
        raise EmulatorError("Azurite needs Node.js: `node` not found on PATH; install Node.js 18+")
    root = azurite_dir()
    script = root / "node_modules/.bin/azurite-blob"
    if script.is_file():
        return script
    npm = shutil.which("npm")
    if npm is None or not install:
        raise EmulatorError(
            f"Azurite not installed in {root} and `npm` not found; install Node.js with npm, or "
            f"run `npm install --prefix {root} {AZURITE_PACKAGE}`"
        )
    root.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [npm, "install", "--prefix", str(root), "--no-audit", "--no-fund", AZURITE_PACKAGE],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0 or not script.is_file():
        raise EmulatorError(f"npm install {AZURITE_PACKAGE} failed: {done.stderr[-2000:]}")
    return script


class Azurite(LocalServer):
    """``azurite-blob`` on a free port, data under ``data_dir``.

    >>> with Azurite(tmp / "azurite") as az:  # doctest: +SKIP
    ...     az.create_container("models")
    ...     az.put("models", "llama/config.json", b"{}")
    ...     fetch("az://models/llama/", dest, FetchConfig(endpoint=az.endpoint))
    """

    name = "azurite-blob"

    @property
    def endpoint(self) -> str:
        """Blob endpoint including the account, as ``--endpoint`` wants it."""
        assert self.port, "Azurite not started"
        return f"http://{self.host}:{self.port}/{ACCOUNT}"

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that let spotstart (and obstore) use this emulator."""
        return {
            "AZURE_STORAGE_ACCOUNT_NAME": ACCOUNT,
            "AZURE_STORAGE_ACCOUNT_KEY": ACCOUNT_KEY,
            "AZURE_STORAGE_ENDPOINT": self.endpoint,
        }

    def start(self, timeout_s: float = 60.0) -> None:
        script = find_azurite_blob()
        self.port = free_port(self.host)
        argv = [
            str(script),
            "--blobHost",
            self.host,
            "--blobPort",
            str(self.port),
            "--location",
            str(self.data_dir),
            "--silent",
            "--skipApiVersionCheck",
            "--loose",
            # Azurite phones home by default; tests and demos stay on loopback
            "--disableTelemetry",
        ]
        # custom accounts from the caller's environment would replace the well-known one
        env = {k: v for k, v in os.environ.items() if k != "AZURITE_ACCOUNTS"}
        self._launch(argv, "?comp=list", timeout_s, env, self.data_dir / "azurite.log")

    def __enter__(self) -> Azurite:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- seeding -----------------------------------------------------------------------
    def create_container(self, name: str) -> None:
        """Create container ``name`` (obstore cannot); an existing one is fine."""
        # Create Container signed with Shared Key: the string to sign is the verb, eleven
        # empty standard headers, the x-ms-* headers and the account-qualified resource.
        date = email.utils.formatdate(usegmt=True)
        path = f"/{ACCOUNT}/{name}"
        to_sign = (
            "PUT\n"
            + "\n" * 11
            + f"x-ms-date:{date}\nx-ms-version:{_API_VERSION}\n"
            + f"/{ACCOUNT}{path}\nrestype:container"
        )
        digest = hmac.new(base64.b64decode(ACCOUNT_KEY), to_sign.encode(), hashlib.sha256)
        signature = base64.b64encode(digest.digest()).decode()
        assert self.port is not None, "Azurite not started"
        request = urllib.request.Request(
            f"http://{self.host}:{self.port}{path}?restype=container",
            method="PUT",
            headers={
                "x-ms-date": date,
                "x-ms-version": _API_VERSION,
                "Authorization": f"SharedKey {ACCOUNT}:{signature}",
                "Content-Length": "0",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=10):
                return
        except urllib.error.HTTPError as exc:
            if exc.code != 409:  # ContainerAlreadyExists
                raise EmulatorError(f"Azurite: cannot create container {name}: {exc}") from exc

    def store(self, container: str) -> Any:
        """An obstore ``AzureStore`` for ``container`` with the development account."""
        from obstore.store import AzureStore

        return AzureStore(
            container,
            account_name=ACCOUNT,
            account_key=ACCOUNT_KEY,
            endpoint=self.endpoint,
            client_options={"allow_http": True},
        )

    def put(self, container: str, key: str, data: bytes) -> None:
        """Upload one blob (obstore switches to a multipart upload above its threshold)."""
        import obstore

        obstore.put(self.store(container), key, data)
