"""Medians, ratios and the markdown table of bench/vllm (no measuring here)."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MB = 1e6

# (column, how to read it from a run record); None when a run has no such figure
COLUMNS: list[tuple[str, str]] = [
    ("First token s", "first_token_s"),
    ("Ready s", "ready_s"),
    ("Load starts at s", "phases.at_load_start_s"),
    ("Before vLLM s", "before_vllm_s"),
    ("Loader path s", "loader_path_s"),
    ("Weights s", "phases.weights_s"),
    ("Model load s", "phases.model_load_s"),
    ("Init engine s", "phases.init_engine_s"),
    ("Warm-up s", "phases.warmup_s"),
    ("API up at s", "phases.at_api_up_s"),
    ("Peak RSS MB", "memory.peak_tree_rss_bytes"),
    ("Peak PSS MB", "memory.peak_tree_pss_bytes"),
    ("Link MB", "link.body_bytes_down"),
]


def _loader_path(rec: dict[str, Any]) -> float | None:
    """The part of a start that depends on the contender: the fetch before vLLM (if any) plus
    vLLM's model load (modules, weights, post-processing)."""
    load = _get(rec, "phases.model_load_s")
    before = _get(rec, "before_vllm_s")
    return None if load is None or before is None else round(load + before, 3)


def _get(rec: dict[str, Any], path: str) -> float | None:
    if path == "loader_path_s":
        return _loader_path(rec)
    cur: Any = rec
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return float(cur) if isinstance(cur, int | float) else None


def _median(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarize(records: Sequence[dict[str, Any]], contenders: Sequence[Any]) -> list[dict[str, Any]]:
    rows = []
    for c in contenders:
        timed = [r for r in records if r["contender"] == c.key and r["round"] != "warmup"]
        ok = [r for r in timed if r.get("ok")]
        row: dict[str, Any] = {"key": c.key, "name": c.name, "runs": len(timed), "ok_runs": len(ok)}
        for _col, path in COLUMNS:
            row[path] = _median([_get(r, path) for r in ok])
            row[path + ".all"] = [_get(r, path) for r in ok]
        row["fetch_peak_rss"] = _median([_get(r, "step.memory.peak_tree_rss_bytes") for r in ok])
        rows.append(row)
    return rows


def _fmt(path: str, v: float | None) -> str:
    if v is None:
        return "-"
    if path.endswith("bytes") or path.endswith("bytes_down"):
        return f"{v / MB:.0f}"
    return f"{v:.2f}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def ratio_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    by = {r["key"]: r for r in rows}
    ours = by.get("spotstart")
    if ours is None:
        return ["- `--load-format spotstart` did not run: no spotstart ratios"]
    out = []
    for key, label in (("runai", "runai_streamer"), ("fetch", "fetch-then-load")):
        other = by.get(key)
        if other is None:
            continue
        parts = []
        for name, path in (
            ("first token", "first_token_s"),
            ("loader path", "loader_path_s"),
            ("weights", "phases.weights_s"),
            ("model load", "phases.model_load_s"),
            ("peak PSS", "memory.peak_tree_pss_bytes"),
            ("peak RSS", "memory.peak_tree_rss_bytes"),
        ):
            parts.append(f"{name} {_ratio(ours[path], other[path])}")
        out.append(f"- spotstart / {label}: " + ", ".join(parts) + " (below 1 = spotstart less)")
    return out


def guard_lines(guard: dict[str, Any]) -> list[str]:
    if not guard:
        return ["- guard latency: not run"]
    if not guard.get("ok"):
        return [f"- guard latency: FAILED: {str(guard.get('error'))[:400]}"]
    lines = [
        "",
        "Guard in front of vLLM (same requests, alternating direct / through `spotstart guard`; "
        "32 tokens, greedy, `ignore_eos`; medians, ms):",
        "",
        "| Requests | n | Direct TTFT | Guard TTFT | Added TTFT (paired) | Direct total | "
        "Guard total | Added total (paired) | All 200, 32 tokens | Same text |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, label in (("stream", "streamed (SSE)"), ("plain", "non-streamed")):
        s = guard["summary"][kind]
        lines.append(
            f"| {label} | {s['n']} | {s['direct_ttft_ms']:.1f} | {s['guard_ttft_ms']:.1f} | "
            f"{s['added_ttft_ms_paired_median']:+.1f} | {s['direct_total_ms']:.1f} | "
            f"{s['guard_total_ms']:.1f} | {s['added_total_ms_paired_median']:+.1f} | "
            f"{s['all_200_and_32_tokens']} | {s['same_text_direct_and_guard']} |"
        )
    mem = guard.get("guard_memory", {})
    lines += [
        "",
        f"- Non-streamed TTFT is the whole answer. Guard process peak RSS "
        f"{mem.get('peak_tree_rss_bytes', 0) / MB:.0f} MB. Guard: "
        f"`{' '.join(Path(a).name if i == 0 else a for i, a in enumerate(guard['guard_argv']))}`",
    ]
    return lines


def markdown(
    records: Sequence[dict[str, Any]],
    rows: Sequence[dict[str, Any]],
    guard: dict[str, Any],
    env: dict[str, Any],
) -> str:
    head = ["Contender", "Runs ok"] + [c for c, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"], f"{r['ok_runs']}/{r['runs']}"]
        cells += [_fmt(path, r[path]) for _, path in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    link = env["link"]
    v = env["versions"]
    wb = env["weights_bytes"]
    cap = link.get("aggregate_bytes_per_s")
    lines += ["", *ratio_lines(rows)]
    lines += [
        "",
        f"- Model: Llama, {env['model_note']}, {wb / MB:.0f} MB of BF16 safetensors "
        f"({len(env['model_files'])} files), served as `tiny`, `--max-model-len 2048`",
        f"- Same S3 bucket (seaweedfs) behind the same emulated link: "
        f"{(link.get('per_conn_bytes_per_s') or 0) / MB:g} MB/s per connection, "
        f"{(cap or 0) / MB:g} MB/s in all, {link['first_byte_latency_s'] * 1000:g} ms to first "
        f"byte (the weights alone: {wb / cap if cap else 0:.2f} s at the link cap)",
        f"- Medians of {env['rounds']} timed starts per contender, contenders rotated across "
        f"rounds; every start a fresh vLLM process tree under the engine lock; "
        + (
            "one untimed warm-up start per contender first (the compile caches are shared "
            "directories, warmed once for each contender's --model path, which is in vLLM's "
            "cache key; every timed start sees warm caches)"
            if env["warmup"]
            else "no warm-up start (compile caches shared, as the first start left them)"
        ),
        "- First token s: launch of the contender (the fetch, where there is one) to the first "
        "streamed token of a 16-token completion; Ready s: to /health 200; Before vLLM s: the "
        "fetch (all files for fetch-then-load, config + tokenizer for spotstart)",
        "- Load starts at s: launch to vLLM's `Starting to load model` (vLLM's own start-up "
        "before any loader runs, plus the fetch where there is one: it varies by 10-20 s from "
        "start to start on this shared machine whatever the loader); Loader path s: Before "
        "vLLM + Model load, per start: the part of the start that depends on the contender",
        "- Weights s: the loader's own figure from vLLM's log (`Loading weights took` for the "
        "default loader and spotstart; Run:ai's `Overall time to stream` for runai_streamer); "
        "Model load s: `Starting to load model` to `Warming up model` (building the modules, "
        "the weights, post-processing), the same two lines for all; Init engine s: vLLM's "
        "`init engine (profile, create kv cache, warmup model) took`; Warm-up s: `Warming up "
        "model` to `Warming up done` (compile + profiling run); API up at s: `Starting vLLM "
        "server on`, since launch",
        "- Peak RSS / PSS: the largest sum over the vLLM process tree (API server, engine core, "
        "worker, their helpers), sampled every 0.25 s from /proc (PSS: shared pages split "
        "between processes, so the sum is honest; RSS counts shared libraries once per process); "
        "the fetch before vLLM is a separate, smaller peak (in the JSON)",
        "- Link MB: response-body bytes the link carried during the start (all of the weights "
        "should cross it once)",
        f"- Page cache dropped before each start: {env['page_cache_dropped']}",
        *_affinity_lines(records),
        f"- Load average (1 min) at starts: median "
        f"{statistics.median(r.get('load_1m', 0) for r in records):.1f}, max "
        f"{max(r.get('load_1m', 0) for r in records):.1f} on {env['cores']} cores (shared machine)",
        f"- Machine: {env['cpu_model']}, {env['cores']} cores, {env['mem_gb']} GB, kernel "
        f"{env['kernel']}; engines venv: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- Run {env['started']} to {env['finished']}: `{' '.join(env['argv'])}`; git "
        f"{env.get('git_head')}, src/spotstart/integrations/vllm.py sha256 "
        f"{env.get('plugin_sha256')}" + (" (uncommitted)" if env.get("plugin_uncommitted") else ""),
    ]
    lines += guard_lines(guard)
    lines += ["", "Per start (seconds):", ""]
    lines.append(
        "| Round | Contender | First token | Before vLLM | Weights | Model load | Init engine | "
        "AOT cache load failed | Link conns | Output equal | Load 1m |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    refs = [r for r in records if r.get("ok") and r["contender"] == "fetch"]
    ref = refs[0]["first_request"].get("text") if refs else None
    for r in records:
        if not r.get("ok"):
            err = str(r.get("error"))[:200].replace("|", "/").replace("\n", " ")
            lines.append(f"| {r['round']} | {r['contender']} | FAILED: {err} |")
            continue
        ph = r["phases"]
        cc = ph.get("compile_cache", {})
        same = "-" if ref is None else str(r["first_request"].get("text") == ref)
        lines.append(
            f"| {r['round']} | {r['contender']} | {r['first_token_s']:.2f} | "
            f"{r['before_vllm_s']:.2f} | {ph.get('weights_s', '-')} | "
            f"{ph.get('model_load_s', '-')} | "
            f"{ph.get('init_engine_s', '-')} | {cc.get('aot_load_failures', 0)} | "
            f"{r['link']['max_concurrent_connections']} | {same} | {r.get('load_1m', 0):.1f} |"
        )
    notes = sorted(
        {
            f"{r['contender']}: {r['phases']['loader_note']}"
            for r in records
            if r.get("ok") and r["phases"].get("loader_note")
        }
    )
    fetch_s = [
        (r["contender"], r["step"]["summary"].get("seconds"))
        for r in records
        if r.get("ok") and r.get("step") and r["step"].get("summary")
    ]
    if notes or fetch_s:
        lines += ["", "Loaders' own lines (one per start):", ""]
        lines += [f"- {n}" for n in notes]
        lines += [
            "- `spotstart fetch --json` seconds (its own clock, per start, in order): "
            + ", ".join(f"{k} {x:.2f}" for k, x in fetch_s if isinstance(x, int | float))
        ]
    lines += ["", "Commands (URL = s3://bkt/llama/; DIR a fresh directory; same env for all):", ""]
    seen = set()
    for r in records:
        if r["contender"] in seen or "argv" not in r:
            continue
        seen.add(r["contender"])
        step = r.get("step")
        pre = f"`{' '.join(_short(step['argv']))}` then " if step else ""
        lines.append(f"- {r['contender']}: {pre}`{' '.join(_short(r['argv']))}`")
    return "\n".join(lines) + "\n"


def _affinity_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    """Which CPUs vLLM's largest process (its worker, where every loader runs) may use."""
    seen: dict[str, str] = {}
    for r in records:
        mem = r.get("memory") or {}
        hwm, cpus = mem.get("vmhwm_by_process") or {}, mem.get("cpus_allowed_by_process") or {}
        if hwm and r.get("ok"):
            big = max(hwm, key=lambda k: hwm[k])
            seen.setdefault(r["contender"], cpus.get(big, "?"))
    if not seen:
        return []
    return [
        "- CPUs the vLLM worker (the largest process: where the weights are loaded, by every "
        "loader) may run on, from /proc: "
        + ", ".join(f"{k} {v}" for k, v in seen.items())
        + " (vLLM's CPU backend pins it; the fetch before vLLM runs on all cores)"
    ]


def _short(argv: Sequence[str]) -> list[str]:
    out: list[str] = []
    for i, a in enumerate(argv):
        if i == 0:
            a = Path(a).name
        elif a.startswith("/"):
            a = "DIR"
        elif out and out[-1] == "--port":
            a = "PORT"
        if a.startswith("{"):
            a = f"'{a}'"
        elif a == "*.safetensors":
            a = "'*.safetensors'"
        out.append(a)
    return out


def write_results(
    path_json: Path,
    path_md: Path,
    records: Sequence[dict[str, Any]],
    contenders: Sequence[Any],
    guard: dict[str, Any],
    env: dict[str, Any],
) -> list[dict[str, Any]]:
    rows = summarize(records, contenders)
    path_json.parent.mkdir(parents=True, exist_ok=True)
    doc = {"environment": env, "summary": rows, "runs": list(records), "guard": guard}
    path_json.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    path_md.write_text(markdown(records, rows, guard, env))
    return rows


def main(argv: list[str] | None = None) -> int:
    """Rewrite the markdown from a results JSON: python bench/vllm/report.py RESULTS.json"""
    import argparse
    import types

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("results", type=Path)
    p.add_argument(
        "--md",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "results" / "vllm-latest.md",
    )
    args = p.parse_args(argv)
    doc = json.loads(args.results.read_text())
    keys = [row["key"] for row in doc["summary"]]
    names = {row["key"]: row["name"] for row in doc["summary"]}
    contenders = [types.SimpleNamespace(key=k, name=names[k]) for k in keys]
    rows = summarize(doc["runs"], contenders)
    args.md.write_text(markdown(doc["runs"], rows, doc["guard"], doc["environment"]))
    print(f"wrote {args.md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
