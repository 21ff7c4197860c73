"""How each tool in the fetch benchmark is invoked against the storage emulator.

One `Tool` per row of the table: a command line, the environment and a private config dir, so no
tool reads a user's real cloud config or credentials. Not a wrapper library for these tools.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Cloud settings of the user's shell that would steer a tool away from the emulator.
_SCRUB_PREFIXES = ("AWS_", "BOTO_", "CLOUDSDK_", "GOOGLE_", "GCE_", "RCLONE_", "S5CMD_")
_SCRUB_NAMES = ("STORAGE_EMULATOR_HOST", "CLOUD_STORAGE_EMULATOR_ENDPOINT", "BOTO_CONFIG")
# The machine sets AWS_CA_BUNDLE for its own proxy; keep it for the tools that ignore it on plain
# http, drop it for rclone, whose S3 backend fails on it (BENCH-NOTES).
_KEEP = ("AWS_CA_BUNDLE",)


@dataclass(frozen=True)
class RunContext:
    """Everything a tool needs for one run."""

    info: Mapping[str, Any]  # the emulator's ready JSON
    bucket: str
    prefix: str  # "model/" (with the slash)
    dest: Path  # fresh, existing, empty
    config_dir: Path  # fresh, existing, empty; the tool's private config/state


@dataclass(frozen=True)
class Invocation:
    argv: list[str]
    env: dict[str, str]


@dataclass(frozen=True)
class Tool:
    name: str  # row label
    store: str  # "gs" or "s3"
    concurrency: str  # what its defaults (or our flags) mean for parallelism
    build: Callable[[RunContext], Invocation]
    version_argv: list[str]
    ours: bool = False


def _venv_bin(name: str) -> str:
    """Prefer the binary next to this interpreter (the dev venv), then PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    return shutil.which(name) or name


def base_env(keep_ca_bundle: bool = True) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not (key.startswith(_SCRUB_PREFIXES) or key in _SCRUB_NAMES)
        or (keep_ca_bundle and key in _KEEP)
    }
    # tools that print progress bars do less work when they see no terminal
    env["TERM"] = "dumb"
    return env


def _s3_env(ctx: RunContext) -> dict[str, str]:
    s3 = ctx.info["s3"]
    (ctx.config_dir / "aws-config").write_text("[default]\n")
    (ctx.config_dir / "aws-credentials").write_text("[default]\n")
    return {
        "AWS_ENDPOINT_URL": s3["endpoint"],
        "AWS_ENDPOINT_URL_S3": s3["endpoint"],
        "AWS_ACCESS_KEY_ID": s3["access_key_id"],
        "AWS_SECRET_ACCESS_KEY": s3["secret_access_key"],
        "AWS_REGION": s3["region"],
        "AWS_DEFAULT_REGION": s3["region"],
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(ctx.config_dir / "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(ctx.config_dir / "aws-credentials"),
    }


def _gcloud_env(ctx: RunContext) -> dict[str, str]:
    gcs = ctx.info["gcs"]
    return {
        "CLOUDSDK_CONFIG": str(ctx.config_dir / "gcloud"),
        "CLOUDSDK_API_ENDPOINT_OVERRIDES_STORAGE": gcs["endpoint"] + "/",
        "CLOUDSDK_AUTH_DISABLE_CREDENTIALS": "true",
        "CLOUDSDK_CORE_PROJECT": "test",
        "CLOUDSDK_CORE_DISABLE_USAGE_REPORTING": "true",
        "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "true",
        "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
    }


def _boto_env(ctx: RunContext) -> dict[str, str]:
    """gsutil speaks the JSON API over https only: point it at the emulator's TLS port."""
    https = urllib.parse.urlsplit(ctx.info["gcs"]["https_endpoint"])
    state = ctx.config_dir / "gsutil-state"
    boto = ctx.config_dir / "boto.cfg"
    boto.write_text(
        "[Credentials]\n"
        f"gs_json_host = {https.hostname}\n"
        f"gs_json_port = {https.port}\n"
        "[Boto]\n"
        "https_validate_certificates = False\n"
        "[GSUtil]\n"
        f"state_dir = {state}\n"
        "software_update_check_period = 0\n"
        "default_project_id = test\n"
    )
    env = _gcloud_env(ctx)
    env["BOTO_CONFIG"] = str(boto)
    env["BOTO_PATH"] = str(boto)
    return env


def _src(ctx: RunContext, scheme: str) -> str:
    return f"{scheme}://{ctx.bucket}/{ctx.prefix}"


def _spotstart(store: str) -> Callable[[RunContext], Invocation]:
    def build(ctx: RunContext) -> Invocation:
        env = base_env()
        if store == "gs":
            env["STORAGE_EMULATOR_HOST"] = ctx.info["gcs"]["endpoint"]
        else:
            env |= _s3_env(ctx)
        argv = [_venv_bin("spotstart"), "fetch", _src(ctx, store), str(ctx.dest), "--json"]
        return Invocation(argv, env)

    return build


def _gsutil(parallel: bool) -> Callable[[RunContext], Invocation]:
    def build(ctx: RunContext) -> Invocation:
        env = base_env() | _boto_env(ctx)
        src = _src(ctx, "gs").rstrip("/")
        if parallel:
            argv = ["gsutil", "-m", "cp", "-r", src, str(ctx.dest)]
        else:
            argv = [
                "gsutil",
                "-o",
                "GSUtil:parallel_process_count=1",
                "-o",
                "GSUtil:parallel_thread_count=1",
                "cp",
                "-r",
                src,
                str(ctx.dest),
            ]
        return Invocation(argv, env)

    return build


def _gcloud_storage(ctx: RunContext) -> Invocation:
    env = base_env() | _gcloud_env(ctx)
    src = _src(ctx, "gs").rstrip("/")
    return Invocation(["gcloud", "storage", "cp", "-r", src, str(ctx.dest)], env)


def _aws(ctx: RunContext) -> Invocation:
    env = base_env() | _s3_env(ctx)
    argv = [
        _venv_bin("aws"),
        "s3",
        "cp",
        "--recursive",
        "--only-show-errors",
        "--endpoint-url",
        ctx.info["s3"]["endpoint"],
        _src(ctx, "s3"),
        str(ctx.dest),
    ]
    return Invocation(argv, env)


def _s5cmd(ctx: RunContext) -> Invocation:
    env = base_env() | _s3_env(ctx)
    argv = [
        _venv_bin("s5cmd"),
        "--log",
        "error",
        "--endpoint-url",
        ctx.info["s3"]["endpoint"],
        "cp",
        _src(ctx, "s3") + "*",
        str(ctx.dest) + "/",
    ]
    return Invocation(argv, env)


def _rclone(ctx: RunContext) -> Invocation:
    s3 = ctx.info["s3"]
    conf = ctx.config_dir / "rclone.conf"
    conf.write_text("")
    env = base_env(keep_ca_bundle=False) | {
        "RCLONE_CONFIG": str(conf),
        "RCLONE_CACHE_DIR": str(ctx.config_dir / "rclone-cache"),
        "RCLONE_CONFIG_EMU_TYPE": "s3",
        "RCLONE_CONFIG_EMU_PROVIDER": "Other",
        "RCLONE_CONFIG_EMU_ENDPOINT": s3["endpoint"],
        "RCLONE_CONFIG_EMU_ACCESS_KEY_ID": s3["access_key_id"],
        "RCLONE_CONFIG_EMU_SECRET_ACCESS_KEY": s3["secret_access_key"],
        "RCLONE_CONFIG_EMU_REGION": s3["region"],
        "RCLONE_CONFIG_EMU_FORCE_PATH_STYLE": "true",
    }
    src = f"emu:{ctx.bucket}/{ctx.prefix.rstrip('/')}"
    return Invocation([_venv_bin("rclone"), "copy", src, str(ctx.dest)], env)


TOOLS: tuple[Tool, ...] = (
    Tool(
        "spotstart gs://",
        "gs",
        "auto (up to 64 ranged streams)",
        _spotstart("gs"),
        [_venv_bin("spotstart"), "--version"],
        ours=True,
    ),
    Tool(
        "spotstart s3://",
        "s3",
        "auto (up to 64 ranged streams)",
        _spotstart("s3"),
        [_venv_bin("spotstart"), "--version"],
        ours=True,
    ),
    Tool(
        "gsutil cp (1 proc, 1 thread)",
        "gs",
        "1 process x 1 thread; with compiled crcmod, objects >= 150 MiB are sliced"
        " (4 slices) but the slices run one after another",
        _gsutil(parallel=False),
        ["gsutil", "version", "-l"],
    ),
    Tool(
        "gsutil -m cp",
        "gs",
        "defaults: processes = cores, 5 threads each; sliced >= 150 MiB (4 slices)",
        _gsutil(parallel=True),
        ["gsutil", "version", "-l"],
    ),
    Tool(
        "gcloud storage cp",
        "gs",
        "defaults: processes = cores, 4 threads each; sliced >150 MiB",
        _gcloud_storage,
        ["gcloud", "version"],
    ),
    Tool(
        "aws s3 cp",
        "s3",
        "defaults: max_concurrent_requests 10, 8 MiB parts",
        _aws,
        [_venv_bin("aws"), "--version"],
    ),
    Tool(
        "s5cmd cp",
        "s3",
        "defaults: 256 workers, 5 parts per file, 50 MiB parts",
        _s5cmd,
        [_venv_bin("s5cmd"), "version"],
    ),
    Tool(
        "rclone copy",
        "s3",
        "defaults: 4 transfers, 4 streams per file >256 MiB",
        _rclone,
        [_venv_bin("rclone"), "version"],
    ),
)


def tool_version(tool: Tool, timeout_s: float = 60.0) -> str:
    """First line of the tool's version output (or why it has none)."""
    try:
        proc = subprocess.run(
            tool.version_argv,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=base_env() | {"CLOUDSDK_CORE_DISABLE_PROMPTS": "1"},
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    lines = (proc.stdout or proc.stderr).strip().splitlines()
    if not lines:
        return f"exit {proc.returncode}"
    # gsutil version -l: whether sliced downloads are possible at all
    extra = [ln.strip() for ln in lines[1:] if "crcmod" in ln or "multiprocessing" in ln]
    return ", ".join([lines[0].strip(), *extra])
