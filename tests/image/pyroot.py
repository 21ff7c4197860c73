"""A small root file system holding a real Python (Debian's /usr/bin/python3 with the shared
libraries ldd names and the standard library, tests and GUI modules left out) and a server that
reads a weights file at start: what `image profile` is tested on."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

SERVER = """
import http.server, json, os, sys
port = int(sys.argv[1])
with open("/models/model.safetensors", "rb") as f:
    head = f.read(8)
size = os.path.getsize("/models/model.safetensors")
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"ok": True, "weights": size}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
print("serving on", port, flush=True)
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""
WEIGHTS_BYTES = 3 << 20
_SKIP = {
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "__pycache__",
    "site-packages",
    "dist-packages",
}


def host_python() -> Path:
    for candidate in ("/usr/bin/python3", shutil.which("python3") or ""):
        if candidate and Path(candidate).exists():
            return Path(os.path.realpath(candidate))
    return Path(os.path.realpath(sys.executable))


def _copy(src: Path, root: Path) -> None:
    dest = root / str(src).lstrip("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists():
        shutil.copy2(src, dest)


def build(root: Path) -> Path:
    """Fill ``root``; the python inside is /usr/bin/python3 (a symlink, like Debian's)."""
    python = host_python()
    out = subprocess.run(["ldd", str(python)], capture_output=True, text=True, check=True).stdout
    for m in re.finditer(r"(/\S+)", out):
        lib = Path(m.group(1))
        _copy(lib, root)
        real = Path(os.path.realpath(lib))
        _copy(real, root)
    _copy(python, root)
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    link = root / "usr/bin/python3"
    if not link.exists():
        link.symlink_to(python.name)
    stdlib = Path(sysconfig.get_paths(vars={"installed_base": "/usr", "base": "/usr"})["stdlib"])
    if not stdlib.exists():
        stdlib = Path(f"/usr/lib/python{sys.version_info.major}.{sys.version_info.minor}")
    shutil.copytree(
        stdlib,
        root / str(stdlib).lstrip("/"),
        symlinks=True,
        dirs_exist_ok=True,
        ignore=lambda d, names: [n for n in names if n in _SKIP],
    )
    for d in ("dev", "proc", "sys", "tmp", "app", "models"):
        (root / d).mkdir(exist_ok=True)
    (root / "app/server.py").write_text(SERVER)
    (root / "models/model.safetensors").write_bytes(os.urandom(WEIGHTS_BYTES))
    # the loader the kernel maps for python (its PT_INTERP) must be in the root too
    return root
