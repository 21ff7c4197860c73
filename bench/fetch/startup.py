"""How fast the `spotstart` command starts: imports of `--version` / `--help`, and the time from
exec to the first request of `spotstart fetch` arriving at a local http server.

    python bench/fetch/startup.py                      # this checkout, 7 runs each
    python bench/fetch/startup.py --src /tmp/old/src   # another tree (e.g. `git archive` of HEAD~)
    python bench/fetch/startup.py --json out.json
    git archive HEAD~3 src | tar -x -C /tmp/old                 # a tree from before a change
    python bench/fetch/startup.py --before /tmp/old/src --write-results   # both, alternating:
                                     # bench/results/startup-<stamp>.json and startup-latest.md

Every figure is a median of --repeats runs of a fresh interpreter (`python -m spotstart ...`),
with the spotstart tree given by --src first on PYTHONPATH. The http server is a thread in this
process: it answers HEAD and ranged GETs for one object and records when each request's first
line arrived (CLOCK_MONOTONIC, the same clock for every process on the machine). "First request"
is that arrival minus the moment just before exec. Not a throughput test: see run.py.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HEAVY = (
    "aiohttp",
    "botocore",
    "google.auth",
    "obstore",
    "rich",
    "numpy",
    "torch",
    "yaml",
    "prometheus_client",
    "zstandard",
    "awscrt",
)
OBJECT_BYTES = 4 << 20


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    arrivals: list[float]
    body: bytes


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def parse_request(self) -> bool:
        self.server.arrivals.append(time.monotonic())
        return super().parse_request()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _headers(self, status: int, length: int, extra: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", '"v1"')
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()

    def do_HEAD(self) -> None:
        self._headers(200, len(self.server.body), {})

    def do_GET(self) -> None:
        body = self.server.body
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if m is None:
            self._headers(200, len(body), {})
            self.wfile.write(body)
            return
        lo = int(m.group(1))
        hi = min(int(m.group(2) or len(body) - 1), len(body) - 1)
        part = body[lo : hi + 1]
        self._headers(206, len(part), {"Content-Range": f"bytes {lo}-{hi}/{len(body)}"})
        self.wfile.write(part)


def _env(src: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")]).rstrip(":")
    env["TERM"] = "dumb"
    return env


def precompile(env: dict[str, str]) -> str:
    """Byte-compile the spotstart tree ``env`` imports, as pip does when it installs a wheel:
    a checkout run with PYTHONDONTWRITEBYTECODE (this machine sets it) would otherwise compile
    every module from source on every start, a cost no installed copy pays. Returns the tree."""
    where = subprocess.run(
        [sys.executable, "-c", "import spotstart, os; print(os.path.dirname(spotstart.__file__))"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    subprocess.run([sys.executable, "-m", "compileall", "-q", where], env=env, check=True)
    return where


def _imports(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """`python -X importtime -m spotstart ARGS`: modules imported, the summed cumulative time of
    the top-level imports (what the interpreter spent importing), the heavy ones among them."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "spotstart", *args],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [ln.split("|") for ln in proc.stderr.splitlines() if ln.startswith("import time:")]
    rows = [r for r in rows if r[1].strip().isdigit()]
    names = [r[2].strip() for r in rows]
    top_us = sum(int(r[1]) for r in rows if not r[2].startswith("  "))
    heavy = sorted({h for h in HEAVY for n in names if n == h or n.startswith(h + ".")})
    return {"modules": len(rows), "import_ms": top_us / 1000, "heavy": heavy}


def _wall(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, capture_output=True, check=True)
    return time.perf_counter() - start


def _fetch_once(server: _Server, env: dict[str, str], work: Path) -> tuple[float, float]:
    """(exec -> first request at the server, exec -> exit), seconds."""
    dest = work / f"dest-{time.monotonic_ns()}"
    url = f"http://127.0.0.1:{server.server_address[1]}/model.bin"
    server.arrivals.clear()
    argv = [sys.executable, "-m", "spotstart", "fetch", url, str(dest), "--json"]
    start = time.monotonic()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    end = time.monotonic()
    if proc.returncode != 0:
        raise SystemExit(f"fetch failed ({proc.returncode}): {proc.stderr[-800:]}")
    if (dest / "model.bin").read_bytes() != server.body:
        raise SystemExit("fetch wrote the wrong bytes")
    shutil.rmtree(dest)
    return server.arrivals[0] - start, end - start


def measure(src: Path | None, repeats: int) -> dict[str, Any]:
    env = _env(src)
    py = [sys.executable, "-m", "spotstart"]
    out: dict[str, Any] = {"src": precompile(env), "bytecode": "precompiled (as pip installs)"}
    _wall([*py, "--help"], env)  # the OS's file cache warm for what follows
    out["version_imports"] = _imports(["--version"], env)
    out["help_imports"] = _imports(["--help"], env)
    out["python_bare_s"] = statistics.median(
        _wall([sys.executable, "-c", "pass"], env) for _ in range(repeats)
    )
    out["version_s"] = statistics.median(_wall([*py, "--version"], env) for _ in range(repeats))
    out["help_s"] = statistics.median(_wall([*py, "--help"], env) for _ in range(repeats))
    server = _Server(("127.0.0.1", 0), _Handler)
    server.arrivals = []
    server.body = os.urandom(OBJECT_BYTES)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with tempfile.TemporaryDirectory(prefix="spotstart-startup-") as work:
            _fetch_once(server, env, Path(work))  # warm the page cache for .pyc files
            runs = [_fetch_once(server, env, Path(work)) for _ in range(repeats)]
    finally:
        server.shutdown()
        server.server_close()
    out["fetch_first_request_s"] = statistics.median(r[0] for r in runs)
    out["fetch_first_request_all_s"] = [round(r[0], 4) for r in runs]
    out["fetch_4mib_wall_s"] = statistics.median(r[1] for r in runs)
    return out


def environment() -> dict[str, Any]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_1m": os.getloadavg()[0],
        "when_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def summary_lines(m: dict[str, Any]) -> list[str]:
    v, h = m["version_imports"], m["help_imports"]
    return [
        f"--version: {v['modules']} modules, {v['import_ms']:.0f} ms importing, "
        f"{m['version_s'] * 1000:.0f} ms wall (bare python {m['python_bare_s'] * 1000:.0f} ms); "
        f"heavy: {', '.join(v['heavy']) or 'none'}",
        f"--help: {h['modules']} modules, {h['import_ms']:.0f} ms importing, "
        f"{m['help_s'] * 1000:.0f} ms wall; heavy: {', '.join(h['heavy']) or 'none'}",
        f"fetch http:// (4 MiB): first request {m['fetch_first_request_s'] * 1000:.0f} ms after "
        f"exec, exit {m['fetch_4mib_wall_s'] * 1000:.0f} ms",
    ]


def _markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    rows = result["rounds"]
    out = [
        "# spotstart start-up: imports and time to the first request",
        "",
        "`python bench/fetch/startup.py --before OLD/src --write-results`: each tree measured "
        f"{len(rows) // 2} times, alternating, each time a median of {result['repeats']} runs "
        "of a fresh interpreter; bytecode precompiled for both trees (as pip installs a wheel). "
        "Import figures are `python -X importtime -m spotstart ...`: modules imported and the "
        "summed cumulative time of the top-level imports.",
        "",
        "| Tree | --version modules | --version import ms | --version wall ms | --help modules "
        "| --help wall ms | fetch: exec to first request ms | fetch 4 MiB: exit ms | heavy in "
        "--version |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m, v, h = r["startup"], r["startup"]["version_imports"], r["startup"]["help_imports"]
        out.append(
            f"| {r['tree']} | {v['modules']} | {v['import_ms']:.0f} | {m['version_s'] * 1000:.0f} "
            f"| {h['modules']} | {m['help_s'] * 1000:.0f} "
            f"| {m['fetch_first_request_s'] * 1000:.0f} | {m['fetch_4mib_wall_s'] * 1000:.0f} "
            f"| {', '.join(v['heavy']) or 'none'} |"
        )
    out += [
        "",
        f"- Machine: {env['cpu_model']}, {env['cores']} cores, kernel {env['kernel']}, "
        f"Python {env['python']}; load average (1 min) {env['load_1m']:.1f} at the start, "
        f"{result['load_1m_end']:.1f} at the end (shared machine: absolute times are noisy, "
        "module counts are not)",
        f"- Bare interpreter (`python -c pass`): {rows[-1]['startup']['python_bare_s'] * 1000:.0f} "
        "ms wall",
        "- The fetch figure: `spotstart fetch http://127.0.0.1:PORT/model.bin DEST --json` "
        "against a threaded local server in the bench process that records when each "
        "request's first line arrives (CLOCK_MONOTONIC); exec is the moment before "
        "`subprocess.run`.",
        f"- Measured {env['when_utc']}",
    ]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--src", type=Path, help="a spotstart source tree (its src/), first on the path")
    p.add_argument("--before", type=Path, help="also measure this tree (its src/), alternating")
    p.add_argument("--rounds", type=int, default=2, help="alternations with --before (2)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument(
        "--write-results",
        action="store_true",
        help="write bench/results/startup-<stamp>.json and startup-latest.md",
    )
    args = p.parse_args(argv)
    result: dict[str, Any] = {"environment": environment(), "repeats": args.repeats}
    if args.before is None:
        result["startup"] = measure(args.src, args.repeats)
        for line in summary_lines(result["startup"]):
            print(line)
    else:
        rounds = []
        for _ in range(args.rounds):
            for tree, src in (("before", args.before), ("after", args.src)):
                m = measure(src, args.repeats)
                rounds.append({"tree": tree, "startup": m})
                for line in summary_lines(m):
                    print(f"{tree}: {line}", flush=True)
        result["rounds"] = rounds
    result["load_1m_end"] = os.getloadavg()[0]
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.write_results:
        results = Path(__file__).resolve().parent.parent / "results"
        stamp = time.strftime("%Y%m%d-%H%M")
        (results / f"startup-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
        if "rounds" in result:
            (results / "startup-latest.md").write_text(_markdown(result))
        print(f"wrote {results}/startup-{stamp}.json and startup-latest.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
