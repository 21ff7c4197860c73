"""The rows of the load benchmark: which worker mode, which store, which environment.

Each contender runs ``worker.py`` in a fresh process with only the emulator's settings in its
environment (the user's own cloud variables are scrubbed by bench/fetch's ``base_env``).
Not a wrapper library for the tools.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools import Invocation, base_env  # bench/fetch/tools.py (run.py puts it on sys.path)

WORKER = Path(__file__).resolve().parent / "worker.py"


@dataclass(frozen=True)
class Contender:
    name: str  # row label
    mode: str  # worker.py --tool
    store: str  # "gs", "s3" or "local"
    device: str = "cpu"
    ours: bool = False  # a spotstart load row: the reference for "this / ours"
    transfer: bool = False  # the measured transfer-only row of its store


@dataclass(frozen=True)
class RunSpec:
    """Everything one run needs besides the contender."""

    info: Mapping[str, Any]  # the emulator's ready JSON
    bucket: str
    prefix: str  # "model/"
    shard_names: list[str]
    reference: Path  # local source files
    dest: Path  # fresh, empty scratch dir
    config_dir: Path  # fresh, empty; private config files
    verify: str


def default_contenders() -> list[Contender]:
    return [
        Contender("spotstart load gs://", "spotstart-load", "gs", ours=True),
        Contender("spotstart load s3://", "spotstart-load", "s3", ours=True),
        Contender("spotstart fetch gs:// + safetensors.load", "fetch-safetensors", "gs"),
        Contender("runai streamer gs://", "runai", "gs"),
        Contender("runai streamer s3://", "runai", "s3"),
        Contender("spotstart fetch gs:// + fastsafetensors", "fetch-fastsafetensors", "gs"),
        Contender("transfer: spotstart fetch gs:// (fsync off)", "fetch-only", "gs", transfer=True),
        Contender("transfer: spotstart fetch s3:// (fsync off)", "fetch-only", "s3", transfer=True),
    ]


def store_env(store: str, spec: RunSpec) -> dict[str, str]:
    """The emulator's settings for every client a worker may use (spotstart, runai)."""
    if store == "gs":
        endpoint = spec.info["gcs"]["endpoint"]
        return {
            "STORAGE_EMULATOR_HOST": endpoint,
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": endpoint,
            "RUNAI_STREAMER_GCS_USE_ANONYMOUS_CREDENTIALS": "true",
            "GOOGLE_CLOUD_PROJECT": "test",
        }
    if store == "s3":
        s3 = spec.info["s3"]
        (spec.config_dir / "aws-config").write_text("[default]\n")
        (spec.config_dir / "aws-credentials").write_text("[default]\n")
        return {
            "AWS_ENDPOINT_URL": s3["endpoint"],
            "AWS_ENDPOINT_URL_S3": s3["endpoint"],
            "AWS_ACCESS_KEY_ID": s3["access_key_id"],
            "AWS_SECRET_ACCESS_KEY": s3["secret_access_key"],
            "AWS_REGION": s3["region"],
            "AWS_DEFAULT_REGION": s3["region"],
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": str(spec.config_dir / "aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(spec.config_dir / "aws-credentials"),
            "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
        }
    return {}


def invocation(c: Contender, spec: RunSpec) -> Invocation:
    src = str(spec.reference) if c.store == "local" else f"{c.store}://{spec.bucket}/{spec.prefix}"
    argv = [sys.executable, str(WORKER), "--tool", c.mode, "--src", src]
    argv += ["--dest", str(spec.dest), "--reference", str(spec.reference)]
    argv += ["--device", c.device, "--verify", spec.verify]
    if c.mode == "runai":
        argv += ["--files", *(src + name for name in spec.shard_names)]
    return Invocation(argv, base_env() | store_env(c.store, spec))


def shown(argv: list[str], spec: RunSpec) -> str:
    """The worker command line as the report prints it: no temp paths."""
    text = " ".join(argv[1:])
    for path, label in ((spec.dest, "DEST"), (spec.reference, "SRC_DIR")):
        text = text.replace(str(path), label)
    text = text.replace(str(WORKER), "bench/load/worker.py")
    if "--files" in text:
        text = text.split(" --files ")[0] + " --files <every shard URL>"
    return "python " + text
