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


@pytest.mark.parametrize("store", ["gs", "s3"])
def test_unreachable_endpoint_is_exit_5(tmp_path: Path, store: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once we leave: nothing listens there
    res = run_cli(
        [
            "fetch",
            f"{store}://{BUCKET}/x/",
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


def test_anonymous_request_refused_by_the_store_names_credentials(
    seeded: StorageEmulator, tmp_path: Path
) -> None:
    env = {"AWS_ENDPOINT_URL": seeded.s3.endpoint, "AWS_REGION": "us-east-1"}
    res = run_cli(["fetch", f"s3://{BUCKET}/cli/b.bin", str(tmp_path), "--anonymous"], env)
    assert res.code == EXIT_CODES["access_denied"], res.stderr
    line = error_line(res.stderr)
    assert "403" in line and "credentials" in line
    assert not (tmp_path / "b.bin").exists()


@pytest.mark.parametrize("store", ["s3", "gs"])
def test_missing_object_is_exit_3_naming_it(
    seeded: StorageEmulator, tmp_path: Path, store: str
) -> None:
    env = {**seeded.env_for_s3(), "STORAGE_EMULATOR_HOST": seeded.gcs.endpoint}
    res = run_cli(["fetch", f"{store}://{BUCKET}/cli/missing.bin", str(tmp_path)], env)
    assert res.code == EXIT_CODES["not_found"], res.stderr
    assert f"{store}://{BUCKET}/cli/missing.bin" in error_line(res.stderr)


def test_missing_http_object_is_exit_3(seeded: StorageEmulator, tmp_path: Path) -> None:
    res = run_cli(["fetch", f"{seeded.http_base}/{BUCKET}/cli/missing.bin", str(tmp_path)])
    assert res.code == EXIT_CODES["not_found"], res.stderr
    assert "not found" in error_line(res.stderr)


def test_missing_local_path_is_exit_3(tmp_path: Path) -> None:
    res = run_cli(["fetch", str(tmp_path / "nope"), str(tmp_path / "dest")])
    assert res.code == EXIT_CODES["not_found"], res.stderr
    assert "nope" in error_line(res.stderr)


def test_include_and_exclude_flags_select_files(seeded: StorageEmulator, tmp_path: Path) -> None:
    seeded.seed_gcs(
        BUCKET,
        {"sel/w.safetensors": b"w" * 3000, "sel/c.json": b"{}", "sel/opt/o.pt": b"o" * 10},
    )
    env = {"STORAGE_EMULATOR_HOST": seeded.gcs.endpoint}
    res = run_cli(
        [
            "fetch",
            f"gs://{BUCKET}/sel",
            str(tmp_path),
            "--include",
            "*.safetensors",
            "--include",
            "*.pt",
            "--exclude",
            "opt/*",
            "--json",
        ],
        env,
    )
    assert res.code == 0, res.stderr
    assert [f["key"] for f in json.loads(res.stdout)["files"]] == ["sel/w.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".spotstart", "w.safetensors"]


def test_globs_that_match_nothing_are_not_found(seeded: StorageEmulator, tmp_path: Path) -> None:
    env = {"STORAGE_EMULATOR_HOST": seeded.gcs.endpoint}
    res = run_cli(["fetch", f"gs://{BUCKET}/cli/", str(tmp_path), "--include", "*.gguf"], env)
    assert res.code == EXIT_CODES["not_found"]
    assert "none matched --include/--exclude" in error_line(res.stderr)


def test_quiet_prints_nothing_and_no_cache_fetches_again(
    seeded: StorageEmulator, tmp_path: Path
) -> None:
    env = seeded.env_for_s3()
    first = run_cli(["fetch", f"s3://{BUCKET}/cli/", str(tmp_path), "-q"], env)
    assert (first.code, first.stdout, first.stderr) == (0, "", "")
    again = run_cli(["fetch", f"s3://{BUCKET}/cli/", str(tmp_path), "--no-cache", "--json"], env)
    assert again.code == 0, again.stderr
    report = json.loads(again.stdout)
    assert report["files_fetched"] == 2 and report["bytes_transferred"] == 5002


def test_sha256_is_identical_on_every_run(seeded: StorageEmulator, tmp_path: Path) -> None:
    import hashlib
    import os

    data = os.urandom(3 << 20)
    seeded.seed_s3(BUCKET, {"same/w.bin": data})
    want = hashlib.sha256(data).hexdigest()
    for i in range(2):
        dest = tmp_path / str(i)
        res = run_cli(
            ["fetch", f"s3://{BUCKET}/same/w.bin", str(dest), "--chunk-size", "1M", "-q"],
            seeded.env_for_s3(),
        )
        assert res.code == 0, res.stderr
        assert hashlib.sha256((dest / "w.bin").read_bytes()).hexdigest() == want
