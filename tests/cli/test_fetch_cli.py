"""`spotstart fetch` as a user runs it: exit codes, one-line errors, JSON output."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from spotstart.emulate.storage import StorageEmulator
from spotstart.errors import EXIT_CODES
from tests.conftest import BUCKET, error_line, run_cli


@pytest.fixture
def seeded(clean_cloud: StorageEmulator) -> StorageEmulator:
    clean_cloud.seed_s3(BUCKET, {"cli/a.json": b"{}", "cli/b.bin": b"b" * 5000})
    clean_cloud.seed_gcs(BUCKET, {"cli/a.json": b"{}", "cli/b.bin": b"b" * 5000})
    return clean_cloud


def test_json_summary_on_success(seeded: StorageEmulator, tmp_path: Path) -> None:
    res = run_cli(["fetch", f"s3://{BUCKET}/cli/", str(tmp_path), "--json"], seeded.env_for_s3())
    assert res.code == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["files_fetched"] == 2 and report["bytes_total"] == 5002
    assert set(report) >= {"bytes_total", "seconds", "mb_per_s", "retries", "files", "verified"}


def test_rerun_says_nothing_was_copied(seeded: StorageEmulator, tmp_path: Path) -> None:
    env = {"STORAGE_EMULATOR_HOST": seeded.gcs.endpoint}
    assert run_cli(["fetch", f"gs://{BUCKET}/cli/", str(tmp_path)], env).code == 0
    res = run_cli(["fetch", f"gs://{BUCKET}/cli/", str(tmp_path)], env)
    assert res.code == 0 and "already current" in res.stdout and "nothing copied" in res.stdout


@pytest.mark.parametrize(
    ("url", "code", "needle"),
    [
        ("ftp://x/y", "usage", "unsupported scheme"),
        ("s3://Bad_Bucket/x", "usage", "not a valid bucket"),
        (f"s3://{BUCKET}/no/such/prefix", "not_found", "no such object or prefix"),
        ("s3://no-such-bucket-x/k", "not_found", "bucket not found"),
        ("gs://no-such-bucket-x/k", "not_found", "bucket not found"),
    ],
)
def test_bad_requests_get_one_line_and_a_distinct_exit_code(
    seeded: StorageEmulator, tmp_path: Path, url: str, code: str, needle: str
) -> None:
    env = {**seeded.env_for_s3(), "STORAGE_EMULATOR_HOST": seeded.gcs.endpoint}
    res = run_cli(["fetch", url, str(tmp_path)], env)
    assert res.code == EXIT_CODES[code], res.stderr
    assert needle in error_line(res.stderr)


def test_missing_credentials_name_the_fix(seeded: StorageEmulator, tmp_path: Path) -> None:
    env = {"AWS_ENDPOINT_URL": seeded.s3.endpoint, "AWS_REGION": "us-east-1"}
    res = run_cli(["fetch", f"s3://{BUCKET}/cli/", str(tmp_path)], env)
    assert res.code == EXIT_CODES["access_denied"]
    assert "no AWS credentials found" in error_line(res.stderr)


def test_wrong_credentials_are_access_denied(seeded: StorageEmulator, tmp_path: Path) -> None:
    env = {**seeded.env_for_s3(), "AWS_SECRET_ACCESS_KEY": "wrong"}
    res = run_cli(["fetch", f"s3://{BUCKET}/cli/", str(tmp_path)], env)
    assert res.code == EXIT_CODES["access_denied"]
    assert "access denied" in error_line(res.stderr)


def test_unreachable_endpoint_is_exit_5(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once we leave: nothing listens there
    res = run_cli(
        [
            "fetch",
            f"gs://{BUCKET}/x/",
            str(tmp_path),
            "--endpoint",
            f"http://127.0.0.1:{port}",
            "--anonymous",
        ]
    )
    assert res.code == EXIT_CODES["unreachable"]
    assert "cannot connect" in error_line(res.stderr)


def test_dest_that_is_a_file_is_a_usage_error(seeded: StorageEmulator, tmp_path: Path) -> None:
    dest = tmp_path / "f"
    dest.write_text("x")
    res = run_cli(["fetch", f"s3://{BUCKET}/cli/", str(dest)], seeded.env_for_s3())
    assert res.code == EXIT_CODES["usage"]
    assert "must be a directory" in error_line(res.stderr)


def test_bad_flag_values_are_usage_errors(tmp_path: Path) -> None:
    res = run_cli(["fetch", "gs://b-ucket/x", str(tmp_path), "--chunk-size", "lots"])
    assert res.code == EXIT_CODES["usage"]
    assert "not a size" in error_line(res.stderr)
