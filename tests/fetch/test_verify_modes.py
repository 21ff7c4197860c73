"""`--verify auto|size|full` on real servers: what each mode checks, and that `full` refuses
an object no checksum covers (exit 6, nothing left behind)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spotstart import FetchConfig, fetch
from spotstart.emulate.crosscheck import Nginx
from spotstart.emulate.storage import StorageEmulator
from spotstart.errors import IntegrityError
from tests.conftest import BUCKET, error_line, run_cli

MiB = 1 << 20
DATA = os.urandom(3 * MiB + 17)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("auto", {"size": 1, "crc32c": 1}), ("size", {"size": 1}), ("full", {"size": 1, "crc32c": 1})],
)
def test_each_mode_checks_what_it_says_on_gcs(
    mode: str,
    expected: dict[str, int],
    cloud: StorageEmulator,
    gcs_env: dict[str, str],
    tmp_path: Path,
) -> None:
    cloud.seed_gcs(BUCKET, {f"verify/{mode}.bin": DATA})
    report = fetch(
        f"gs://{BUCKET}/verify/{mode}.bin", tmp_path, FetchConfig(chunk_bytes=MiB, verify=mode)
    )  # type: ignore[arg-type]
    assert report.verified == expected
    assert (tmp_path / f"{mode}.bin").read_bytes() == DATA


def test_full_refuses_an_object_without_a_checksum(nginx: Nginx, tmp_path: Path) -> None:
    nginx.seed({"plain/model.bin": DATA})
    url = f"{nginx.endpoint}/plain/model.bin"
    with pytest.raises(IntegrityError, match="no checksum"):
        fetch(url, tmp_path / "lib", FetchConfig(verify="full"))
    result = run_cli(["fetch", url, str(tmp_path / "cli"), "--verify", "full"])
    assert result.code == 6, result.stderr
    assert "--verify full needs one" in error_line(result.stderr)
    assert not (tmp_path / "cli" / "model.bin").exists()
    ok = run_cli(["fetch", url, str(tmp_path / "auto")])
    assert ok.code == 0, ok.stderr
    assert (tmp_path / "auto" / "model.bin").read_bytes() == DATA
