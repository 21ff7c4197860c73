"""A fake inference engine for the guard's --engine-cache tests: stdlib only (it starts fast and
imports nothing of spotstart), run as ``python -c`` by tests/guard/test_engine_cache.py."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path
from typing import Any

CACHE_VARS = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "VLLM_CACHE_ROOT")


def fake_engine(port: int, report: str) -> None:
    """A server that "compiles" on a cold start: it writes kernels into the cache directories
    the guard gave it, or finds them there (restored), records which in ``report`` (with the
    SHA-256 of every cache file), then answers /health until SIGTERM."""
    import http.server

    inductor = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    kernel = inductor / "fx" / "kernel.py"
    restored = kernel.is_file()
    if not restored:
        kernel.parent.mkdir(parents=True, exist_ok=True)
        kernel.write_text("def compiled(x):\n    return x + 1\n")
        cubin = Path(os.environ["TRITON_CACHE_DIR"]) / "ab12" / "kernel.cubin"
        cubin.parent.mkdir(parents=True, exist_ok=True)
        size = int(os.environ.get("FAKE_CACHE_BYTES", "65536"))
        cubin.write_bytes(hashlib.shake_256(b"cubin").digest(size))
        graph = Path(os.environ["VLLM_CACHE_ROOT"]) / "torch_compile_cache" / "graph.json"
        graph.parent.mkdir(parents=True, exist_ok=True)
        graph.write_text('{"graph": 1}')
    files = {}
    for var in CACHE_VARS:
        base = Path(os.environ[var])
        for path in sorted(base.rglob("*")):
            if path.is_file():
                rel = f"{var}/{path.relative_to(base)}"
                files[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    doc = {
        "restored": restored,
        "files": files,
        "env": {v: os.environ[v] for v in CACHE_VARS},
        "secret_seen": any("ENGINE_CACHE_SECRET" in k for k in os.environ),
    }
    Path(report).write_text(json.dumps(doc))

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/health" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    def on_term(*_: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
