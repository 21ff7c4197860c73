"""vLLM's ``--load-format spotstart``: a model loader that streams the weights from any source
``spotstart fetch`` takes (gs://, s3://, az://, http(s)://, file://, and peers), verified as
fetch verifies them, into vLLM's own weight loaders, with host memory bounded by a window
(:mod:`spotstart.weights.stream`). Not a way to get the config or tokenizer: vLLM reads those
from ``--model DIR`` before any loader runs, so ``spotstart fetch`` puts them there::

    spotstart fetch gs://b/llama/ /models/llama --exclude '*.safetensors'
    python -m vllm.entrypoints.openai.api_server --model /models/llama \\
        --load-format spotstart --model-loader-extra-config '{"source": "gs://b/llama/"}'

:func:`register` is the ``vllm.general_plugins`` entry point (``pip install
'spotstart[vllm]'`` beside your own vLLM build): vLLM calls it in each of its processes; it
imports vLLM's loader registry only, and nothing at spotstart's import time."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import importlib.abc
import importlib.machinery
import importlib.util
import os
import re
import sys
import time
import types
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from spotstart import untrusted_json
from spotstart.errors import NotFound, SpotstartError, TransientError, UsageError
from spotstart.fetch import Concurrency, FetchConfig
from spotstart.fetch.peers import TOKEN_ENV, PeerSpec, read_token_file
from spotstart.store import parse_url
from spotstart.weights.stream import DEFAULT_WINDOW_BYTES

LOAD_FORMAT = "spotstart"
CONFIG_NAME = "config.json"
MAX_CONFIG_BYTES = 4 << 20
CONFIG_TIMEOUT_S = 60.0  # the source's config.json, all of it, within this (a slow store)
MAX_CONCURRENCY = 1024  # streams: each a connection and a descriptor in the vLLM worker
KEYS = (
    "source",
    "cache_dir",
    "peers",
    "peer_token_file",
    "concurrency",
    "endpoint",
    "anonymous",
    "window_bytes",
    "verify",
    "check_config",
)


@dataclass(frozen=True)
class LoaderSettings:
    """What ``--model-loader-extra-config`` gives the loader. ``source``: the checkpoint (a
    prefix, an ``*.index.json`` or a ``.safetensors`` URL); ``cache_dir``: a local write-through
    copy read on the next start (as ``spotstart load --cache-dir``); ``peers``: ``host:port`` /
    ``dns:NAME:PORT`` entries (a list or a comma-separated string), with ``peer_token_file``
    (else ``$SPOTSTART_PEER_TOKEN``); ``concurrency``: fixed number of streams (default:
    adaptive); ``endpoint``/``anonymous``: as ``fetch --endpoint/--anonymous``;
    ``window_bytes``: the stream's memory window; ``verify``: ``auto`` or ``size``;
    ``check_config``: compare ``--model DIR``'s config.json with the source's (default on)."""

    source: str
    cache_dir: str | None = None
    peers: tuple[str, ...] = ()
    peer_token_file: str | None = None
    concurrency: int | None = None
    endpoint: str | None = None
    anonymous: bool = False
    window_bytes: int = DEFAULT_WINDOW_BYTES
    verify: str = "auto"
    check_config: bool = True

    @classmethod
    def parse(cls, extra: Mapping[str, Any] | None) -> LoaderSettings:
        """From vLLM's ``model_loader_extra_config``; UsageError naming the key at fault."""
        where = "--model-loader-extra-config"
        if not isinstance(extra, Mapping):
            raise UsageError(f'{where}: a JSON object is needed, e.g. {{"source": "gs://b/m/"}}')
        unknown = sorted(set(extra) - set(KEYS))
        if unknown:
            raise UsageError(
                f"{where}: unknown key {unknown[0]!r} for --load-format spotstart; "
                f"known keys: {', '.join(KEYS)}"
            )
        source = extra.get("source")
        if not isinstance(source, str) or not source.strip():
            raise UsageError(
                f'{where}: "source" is missing: the checkpoint\'s URL, e.g. '
                f'{{"source": "gs://bucket/model/"}} (any URL spotstart fetch takes)'
            )
        try:
            parse_url(source)  # a malformed URL fails here, naming the fix
        except UsageError as exc:  # ... without echoing a password or signature it holds
            raise UsageError(_without_secrets_of(source, str(exc))) from None

        def text(key: str) -> str | None:
            value = extra.get(key)
            if value is not None and (not isinstance(value, str) or not value):
                raise UsageError(f"{where}: {key!r} must be a non-empty string")
            return value

        def flag(key: str, default: bool) -> bool:
            value = extra.get(key, default)
            if not isinstance(value, bool):
                raise UsageError(f"{where}: {key!r} must be true or false")
            return value

        def count(key: str) -> int | None:
            value = extra.get(key)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise UsageError(f"{where}: {key!r} must be a positive integer")
            return value

        concurrency = count("concurrency")
        if concurrency is not None and concurrency > MAX_CONCURRENCY:
            raise UsageError(
                f"{where}: 'concurrency' {concurrency} is more than {MAX_CONCURRENCY} streams "
                "(each is a connection and a file descriptor); leave it out for adaptive"
            )
        cache_dir = text("cache_dir")
        if cache_dir is not None and not os.path.isabs(cache_dir):
            raise UsageError(
                f"{where}: 'cache_dir' must be an absolute path (a relative one lands in "
                "whatever directory vLLM was started from)"
            )
        endpoint = text("endpoint")
        if endpoint is not None:
            parts = urlsplit(endpoint)
            if parts.username is not None or parts.password is not None or parts.query:
                raise UsageError(
                    f"{where}: 'endpoint' carries credentials (user:password@ or a query "
                    "string), which would end up in logs and errors: give the store's "
                    "credentials through its environment (e.g. AWS_ACCESS_KEY_ID)"
                )

        peers_raw = extra.get("peers", ())
        if isinstance(peers_raw, str):
            peers_list = [p.strip() for p in peers_raw.split(",") if p.strip()]
        elif isinstance(peers_raw, list | tuple) and all(isinstance(p, str) for p in peers_raw):
            peers_list = [p.strip() for p in peers_raw if p.strip()]
        else:
            raise UsageError(f"{where}: 'peers' must be a list of host:port strings")
        verify = extra.get("verify", "auto")
        if verify not in ("auto", "size"):
            raise UsageError(
                f'{where}: \'verify\' must be "auto" or "size" (a stream cannot reread '
                'every byte after the last, as "full" does)'
            )
        return cls(
            source=source.strip(),
            cache_dir=cache_dir,
            peers=tuple(peers_list),
            peer_token_file=text("peer_token_file"),
            concurrency=concurrency,
            endpoint=endpoint,
            anonymous=flag("anonymous", False),
            window_bytes=count("window_bytes") or DEFAULT_WINDOW_BYTES,
            verify=verify,
            check_config=flag("check_config", True),
        )

    def fetch_config(self) -> FetchConfig:
        """The FetchConfig these settings describe (peers with their token)."""
        peers = None
        if self.peers:
            peers = PeerSpec.parse(list(self.peers), token=self._token())
        concurrency = Concurrency(streams=self.concurrency) if self.concurrency else Concurrency()
        return FetchConfig(
            concurrency=concurrency,
            endpoint=self.endpoint,
            anonymous=self.anonymous,
            verify="size" if self.verify == "size" else "auto",
            peers=peers,
        )

    def _token(self) -> str | None:
        if self.peer_token_file is not None:
            path = Path(self.peer_token_file)
            return read_token_file(path, f"peer_token_file {path}")
        value = os.environ.get(TOKEN_ENV, "").strip()
        return value or None

    def config_url(self) -> str:
        """Where the source's config.json is: beside a file URL, inside a prefix."""
        src = self.source
        if "?" in src or "#" in src:  # checked by the caller: a signed URL has no sibling
            src = src.split("?", 1)[0].split("#", 1)[0]
        if src.endswith(".safetensors") or src.endswith(".index.json"):
            return src[: src.rfind("/") + 1] + CONFIG_NAME
        return src.rstrip("/") + "/" + CONFIG_NAME


async def _read_small(url_text: str, config: FetchConfig) -> bytes | None:
    """A small object's bytes, or None when there is none."""
    from spotstart.fetch.scheduler import source_for

    url = parse_url(url_text)
    source = source_for(url, config)
    key = url.key.lstrip("/") if url.scheme == "file" else url.key
    try:
        try:
            info = await source.stat(key)
        except NotFound:
            return None
        if info.size > MAX_CONFIG_BYTES:
            raise UsageError(f"{redact(url_text)}: {info.size} bytes; not a model config")
        out: list[bytes] = []

        async def sink(piece: bytes) -> None:
            out.append(piece)

        if info.size:
            await source.read(info, 0, info.size, sink)
        return b"".join(out)
    finally:
        await source.close()


def check_config(settings: LoaderSettings, model_dir: str) -> str:
    """Compare ``model_dir``'s config.json with the source's; UsageError when they differ
    (vLLM built the model from one and would be filled with the other's weights). Returns
    what was found, for the log."""
    local = Path(model_dir) / CONFIG_NAME
    if not local.is_file():
        return f"no {local}: config not compared"
    if urlsplit(settings.source).query:
        # A signed URL (?X-Amz-Signature=, ?sig=) signs one object: config.json beside it
        # is not covered by the signature, and asking for it would only fail the start.
        return "the source is a signed URL: config not compared"
    where = redact(settings.config_url())
    plain = FetchConfig(endpoint=settings.endpoint, anonymous=settings.anonymous)

    async def bounded() -> bytes | None:
        try:
            return await asyncio.wait_for(
                _read_small(settings.config_url(), plain), CONFIG_TIMEOUT_S
            )
        except TimeoutError:
            raise TransientError(
                f"{where}: not read within {CONFIG_TIMEOUT_S:g} s; the store is too slow "
                'to compare the config (retry, or set "check_config": false)'
            ) from None

    # On a thread of its own: the caller (a vLLM worker) may be running an event loop.
    with ThreadPoolExecutor(1, thread_name_prefix="spotstart-config") as pool:
        remote = pool.submit(asyncio.run, bounded()).result()
    if remote is None:
        return f"the source has no {CONFIG_NAME}: config not compared"
    mine = untrusted_json.parse(local.read_bytes(), what=str(local))
    theirs = untrusted_json.parse(remote, what=where)
    if mine != theirs:
        raise UsageError(
            f"{local} differs from {where}: vLLM built the model from one "
            "config and would fill it with another model's weights; fetch the config again "
            f"(spotstart fetch {redact(settings.source)} {model_dir} --exclude "
            "'*.safetensors'), or set \"check_config\": false"
        )
    return f"{CONFIG_NAME} matches the source"


def redact(url: str) -> str:
    """``url`` fit for a log line: no query string (a presigned signature, a SAS token), no
    fragment, no ``user:password@``."""
    parts = urlsplit(url)
    if not (parts.query or parts.fragment or "@" in parts.netloc):
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    query = "<redacted>" if parts.query else ""
    return urlunsplit((parts.scheme, host, parts.path, query, ""))


_QUERY = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s?#'\"<>]*)\?[^\s'\"<>)]*")
_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@'\"<>]+@")


def scrub(text: str) -> str:
    """``text`` with every URL's query string and ``user:password@`` taken out."""
    return _USERINFO.sub(r"\1", _QUERY.sub(r"\1?<redacted>", text))


@contextlib.contextmanager
def errors_scrubbed() -> Iterator[None]:
    """Re-raise an error whose message carries a URL's query string (a presigned signature,
    a SAS token) or a password with those taken out, same type, its cause not shown: vLLM
    logs the traceback of a failed start, and logs are read by more people than the bucket."""
    try:
        yield
    except Exception as exc:
        text = str(exc)
        clean = scrub(text)
        if clean == text:
            raise
        raise _with_message(exc, clean) from None


def _with_message(exc: Exception, message: str) -> Exception:
    with contextlib.suppress(Exception):
        new = copy.copy(exc)
        new.args = (message,)
        if str(new) == message:
            return new
    return SpotstartError(message)


def _without_secrets_of(url: str, text: str) -> str:
    """``text`` (which quotes ``url`` whole or in pieces) without ``url``'s password and
    query string, wherever they appear."""
    parts = urlsplit(url)
    for secret in (parts.password, parts.query):
        if secret:
            text = text.replace(secret, "<redacted>")
    return scrub(text)


def summary(report: Any, peak_bytes: int, seconds: float) -> str:
    """The one line the loader logs."""
    mb = report.bytes_total / 1e6
    return (
        f"spotstart: {report.tensors} tensors, {mb:.1f} MB from {redact(report.source)} in "
        f"{seconds:.2f} s ({mb / seconds if seconds > 0 else 0.0:.1f} MB/s), "
        f"{report.bytes_from_peers / 1e6:.1f} MB from peers, "
        f"{report.bytes_from_cache / 1e6:.1f} MB from the cache, "
        f"verified {report.verified or {}}{_sizes_only(report.verified)}, peak tensor "
        f"memory held {peak_bytes / 1e6:.1f} MB"
    )


def _sizes_only(verified: Mapping[str, int] | None) -> str:
    if verified and set(verified) != {"size"}:
        return ""
    return " (sizes only: the source gives no checksum, a changed byte would pass)"


_REGISTRY = "vllm.model_executor.model_loader"
_REGISTERED: list[type] = []


def register() -> None:
    """The ``vllm.general_plugins`` entry point: adds ``--load-format spotstart``. Cheap and
    harmless in every vLLM process: where vLLM's loader registry is not imported yet (the API
    server never imports it; importing it costs ~0.9 s there, measured), the loader is
    registered when vLLM itself imports the registry. Run more than once, it registers once."""
    if _REGISTERED or any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        return
    module = sys.modules.get(_REGISTRY)
    if module is not None and getattr(module, "register_model_loader", None) is not None:
        _register_into(module)
    else:
        sys.meta_path.insert(0, _RegisterOnImport())


def _register_into(module: Any) -> None:
    if _REGISTERED:
        return
    cls = _loader_class()
    module.register_model_loader(LOAD_FORMAT)(cls)
    _REGISTERED.append(cls)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Registers the loader right after vLLM's loader registry module has run (a post-import
    hook: the module's own loader runs it, then we register), then steps aside."""

    def find_spec(
        self, fullname: str, path: Any = None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _REGISTRY:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        loader = spec.loader if spec is not None else None
        if spec is None or loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module: types.ModuleType) -> None:
            run(module)
            _register_into(module)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _loader_class() -> type:
    from vllm.logger import init_logger
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    logger = init_logger("vllm.model_executor.model_loader.spotstart")

    class SpotstartModelLoader(BaseModelLoader):  # type: ignore[misc]
        """Streams the checkpoint named by ``source`` into vLLM's weight loaders."""

        def __init__(self, load_config: Any) -> None:
            super().__init__(load_config)
            self.settings = LoaderSettings.parse(load_config.model_loader_extra_config)
            self.settings.fetch_config()  # a bad peer entry or token fails at start

        def download_model(self, model_config: Any) -> None:
            """Nothing ahead of time: the weights stream in during load_weights."""

        def get_all_weights(self, model_config: Any, model: Any) -> Iterator[tuple[str, Any]]:
            """The weights as vLLM's in-place reload (``reload_weights``) asks for them."""
            from spotstart.weights.stream import iter_tensors

            settings = self.settings
            with (
                errors_scrubbed(),
                iter_tensors(
                    settings.source,
                    cache_dir=settings.cache_dir if _tp_rank()[0] == 0 else None,
                    config=settings.fetch_config(),
                    window_bytes=settings.window_bytes,
                ) as stream,
            ):
                yield from stream

        def load_weights(self, model: Any, model_config: Any) -> None:
            with errors_scrubbed():
                self._load_weights(model, model_config)

        def _load_weights(self, model: Any, model_config: Any) -> None:
            from spotstart.weights.stream import iter_tensors

            settings = self.settings
            if settings.check_config:
                logger.info("spotstart: %s", check_config(settings, model_config.model))
            rank, world = _tp_rank()
            # Ranks of one tensor-parallel group share a node and would race on one cache
            # directory (nothing locks it): the first rank keeps it, the others stream.
            cache_dir = settings.cache_dir if rank == 0 else None
            t0 = time.perf_counter()
            stream = iter_tensors(
                settings.source,
                cache_dir=cache_dir,
                config=settings.fetch_config(),
                window_bytes=settings.window_bytes,
            )
            with stream:
                loaded = model.load_weights(stream)
                # A model that stops early must not skip the objects' final checks.
                for _ in stream:
                    pass
            seconds = time.perf_counter() - t0
            report = stream.report
            assert report is not None, "a stream that ended without error has its report"
            logger.info("Loading weights took %.2f seconds", seconds)
            where = f" (tensor-parallel rank {rank} of {world})" if world > 1 else ""
            logger.info("%s%s", summary(report, stream.bytes_held_peak, seconds), where)
            track = model_config.quantization is None and loaded is not None
            if track:
                DefaultModelLoader.track_weights_loading(
                    self, model, loaded, quantized=model_config.quantization is not None
                )

    return SpotstartModelLoader


def _tp_rank() -> tuple[int, int]:
    """(rank, world size) of this worker's tensor-parallel group; (0, 1) outside one."""
    try:
        from vllm.distributed import (
            get_tensor_model_parallel_rank,
            get_tensor_model_parallel_world_size,
        )

        return int(get_tensor_model_parallel_rank()), int(get_tensor_model_parallel_world_size())
    except (ImportError, AssertionError, RuntimeError, AttributeError):
        return 0, 1


__all__ = ["LOAD_FORMAT", "LoaderSettings", "check_config", "register", "summary"]
