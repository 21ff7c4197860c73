"""`--metrics-textfile` for fetch and load: the run's numbers as node-exporter reads them
(parsed back with prometheus_client's own parser), and a failed run's exit code."""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from spotstart import FetchConfig, fetch
from spotstart.emulate.checkpoint import write_safetensors
from spotstart.emulate.storage import StorageEmulator
from tests.conftest import BUCKET, error_line, run_cli

DATA = os.urandom(2_000_003)


def _samples(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(path.read_text()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_fetch_writes_its_metrics_for_node_exporter(
    cloud: StorageEmulator, gcs_env: dict[str, str], tmp_path: Path
) -> None:
    cloud.seed_gcs(BUCKET, {"metrics/m.bin": DATA})
    src = f"gs://{BUCKET}/metrics/m.bin"
    prom = tmp_path / "spotstart.prom"
    result = run_cli(
        ["fetch", src, str(tmp_path / "d"), "--metrics-textfile", str(prom)], env=gcs_env
    )
    assert result.code == 0, result.stderr
    got = _samples(prom)
    label = (("source", src),)
    assert got[("spotstart_fetch_exit_code", label)] == 0
    assert got[("spotstart_fetch_bytes_transferred_total", label)] == len(DATA)
    assert got[("spotstart_fetch_files", label)] == 1
    assert got[("spotstart_fetch_verified_files", (("kind", "crc32c"), ("source", src)))] == 1
    assert not list(tmp_path.glob("*.prom.*"))  # written through a temporary file, renamed


def test_a_failed_fetch_records_its_exit_code(
    cloud: StorageEmulator, gcs_env: dict[str, str], tmp_path: Path
) -> None:
    src = f"gs://{BUCKET}/metrics/missing.bin"
    prom = tmp_path / "spotstart.prom"
    result = run_cli(
        ["fetch", src, str(tmp_path / "d"), "--metrics-textfile", str(prom)], env=gcs_env
    )
    assert result.code == 3
    got = _samples(prom)
    assert got[("spotstart_fetch_exit_code", (("source", src),))] == 3
    assert ("spotstart_fetch_last_failure_timestamp_seconds", (("source", src),)) in got


def test_a_textfile_node_exporter_would_not_read_is_refused(tmp_path: Path) -> None:
    result = run_cli(
        ["fetch", "gs://b/x", str(tmp_path), "--metrics-textfile", str(tmp_path / "m.txt")]
    )
    assert result.code == 2
    assert "*.prom" in error_line(result.stderr)


def test_the_python_report_carries_the_same_samples(
    cloud: StorageEmulator, gcs_env: dict[str, str], tmp_path: Path
) -> None:
    cloud.seed_gcs(BUCKET, {"metrics/api.bin": DATA})
    samples = fetch(f"gs://{BUCKET}/metrics/api.bin", tmp_path, FetchConfig()).metrics().samples()
    assert samples["spotstart_fetch_bytes_transferred_total"] == len(DATA)
    assert samples["spotstart_fetch_verified_files:crc32c"] == 1


def test_load_writes_its_metrics(
    cloud: StorageEmulator, gcs_env: dict[str, str], tmp_path: Path
) -> None:
    path = tmp_path / "model.safetensors"
    write_safetensors(path, [("a", "F32", [64, 64]), ("b", "BF16", [128])])
    cloud.seed_gcs(BUCKET, {"metrics/model.safetensors": path.read_bytes()})
    src = f"gs://{BUCKET}/metrics/model.safetensors"
    prom = tmp_path / "load.prom"
    result = run_cli(["load", src, "--metrics-textfile", str(prom), "--json"], env=gcs_env)
    assert result.code == 0, result.stderr
    got = _samples(prom)
    assert got[("spotstart_load_exit_code", (("source", src),))] == 0
    assert got[("spotstart_load_bytes", (("source", src),))] == path.stat().st_size
