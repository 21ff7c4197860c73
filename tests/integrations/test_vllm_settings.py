"""The vLLM loader's settings (``--model-loader-extra-config``) and its config check, without
vLLM: every key at fault is named; register() imports nothing of vLLM's until vLLM does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spotstart.emulate.storage import StorageEmulator
from spotstart.errors import UsageError
from spotstart.integrations.vllm import LoaderSettings, check_config, summary
from spotstart.weights.loader import LoadReport
from tests.conftest import BUCKET


def test_the_source_alone_is_enough_and_gives_the_defaults() -> None:
    s = LoaderSettings.parse({"source": "gs://models/llama/"})
    assert s.source == "gs://models/llama/" and s.check_config and s.verify == "auto"
    config = s.fetch_config()
    assert config.peers is None and config.concurrency.streams is None


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({}, '"source" is missing'),
        ({"source": ""}, '"source" is missing'),
        ({"source": 3}, '"source" is missing'),
        ({"source": "gs://models/m/", "sorce": "x"}, "unknown key 'sorce'"),
        ({"source": "gs://models/m/", "concurrency": 0}, "'concurrency' must be a positive"),
        ({"source": "gs://models/m/", "concurrency": True}, "'concurrency' must be a positive"),
        ({"source": "gs://models/m/", "window_bytes": -1}, "'window_bytes' must be a positive"),
        ({"source": "gs://models/m/", "anonymous": "yes"}, "'anonymous' must be true or false"),
        ({"source": "gs://models/m/", "verify": "full"}, "'verify' must be"),
        ({"source": "gs://models/m/", "peers": 5}, "'peers' must be a list"),
        ({"source": "gs://models/m/", "cache_dir": ""}, "'cache_dir' must be a non-empty"),
        ({"source": "ftp://x/y"}, "ftp"),
    ],
)
def test_a_bad_setting_is_refused_naming_the_key(extra: dict[str, object], named: str) -> None:
    with pytest.raises(UsageError, match=named.replace("(", r"\(")):
        LoaderSettings.parse(extra)


def test_not_an_object_is_refused() -> None:
    with pytest.raises(UsageError, match="JSON object"):
        LoaderSettings.parse(["gs://models/m/"])  # type: ignore[arg-type]


def test_peers_take_a_list_or_a_comma_string_and_a_private_token_file(tmp_path: Path) -> None:
    token = tmp_path / "peer.token"
    token.write_text("a" * 32 + "\n")
    token.chmod(0o600)
    extra = {"source": "s3://models/m/", "peers": "10.0.0.1:8470, 10.0.0.2:8470"}
    s = LoaderSettings.parse({**extra, "peer_token_file": str(token), "concurrency": 8})
    config = s.fetch_config()
    assert config.peers is not None and config.peers.entries == ("10.0.0.1:8470", "10.0.0.2:8470")
    assert config.peers.token == "a" * 32 and config.concurrency.streams == 8
    listed = LoaderSettings.parse({"source": "s3://models/m/", "peers": ["10.0.0.1:8470"]})
    assert listed.peers == ("10.0.0.1:8470",)
    token.chmod(0o644)
    with pytest.raises(UsageError, match="chmod 600"):
        s.fetch_config()


@pytest.mark.parametrize(
    ("source", "config_url"),
    [
        ("gs://models/llama/", "gs://models/llama/config.json"),
        ("gs://models/llama", "gs://models/llama/config.json"),
        ("s3://models/llama/model.safetensors", "s3://models/llama/config.json"),
        ("https://h/m/model.safetensors.index.json", "https://h/m/config.json"),
    ],
)
def test_the_config_is_looked_for_beside_the_weights(source: str, config_url: str) -> None:
    assert LoaderSettings.parse({"source": source}).config_url() == config_url


def test_a_model_dir_whose_config_differs_from_the_source_is_refused(
    clean_cloud: StorageEmulator, tmp_path: Path, gcs_env: dict[str, str]
) -> None:
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 256}
    clean_cloud.seed_gcs(BUCKET, {"cfg/config.json": json.dumps(config).encode()})
    settings = LoaderSettings.parse({"source": f"gs://{BUCKET}/cfg/"})
    (tmp_path / "config.json").write_text(json.dumps(config, indent=2))  # same, spelled apart
    assert "matches" in check_config(settings, str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_size": 512}))
    with pytest.raises(UsageError, match="differs from"):
        check_config(settings, str(tmp_path))
    none = LoaderSettings.parse({"source": f"gs://{BUCKET}/nothing-here/"})
    assert "not compared" in check_config(none, str(tmp_path))


def test_the_summary_line_has_tensors_mb_seconds_rate_and_peers() -> None:
    report = LoadReport(
        "gs://m/x/",
        "cpu",
        1,
        39,
        212_000_000,
        212_000_000,
        0,
        1.0,
        212.0,
        0,
        {"size": 1, "crc32c": 1},
        bytes_from_peers=100_000_000,
    )
    line = summary(report, 64_000_000, 2.0)
    assert "39 tensors, 212.0 MB" in line and "2.00 s (106.0 MB/s)" in line
    assert "100.0 MB from peers" in line and "64.0 MB" in line


def test_register_touches_no_vllm_module_until_vllm_imports_its_loaders() -> None:
    code = (
        "import sys\n"
        "import spotstart.integrations.vllm as v\n"
        "v.register(); v.register()\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('vllm', 'torch')]\n"
        "assert sum(type(f).__name__ == '_RegisterOnImport' for f in sys.meta_path) == 1\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
