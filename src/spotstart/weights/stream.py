"""Tensors of a safetensors checkpoint handed over one by one as their bytes arrive, with host
memory bounded by a window (a serving engine's weight loader consumes them: vLLM's
``--load-format spotstart``). Same sources, checks, cache and peers as :func:`spotstart.load`,
through the same transfer scheduler; not a way to get a state dict (that is ``load``).

Memory: a tensor's memory is allocated when the first chunk that carries its bytes is
admitted to the scheduler, and given up when the consumer has taken the tensor (and, for an
object checked by an in-order MD5 without a cache copy, once the hash has read it). A chunk is
admitted while the bytes held stay within ``window_bytes``, or when everything held is a
tensor that this chunk continues (nothing else can be freed first). So the tensor memory held
by the stream never exceeds ``max(window_bytes, chunk_bytes + 2 * largest_tensor_bytes)``
(a chunk admitted alone holds at most the tensor it continues, the tensors inside it and the
one it starts), plus the scheduler's own bounds (``FetchConfig``: write queue and socket
buffers). ``TensorStream.bytes_held_peak`` is that memory's peak, measured.

Checks: a tensor is handed over once every chunk carrying it has landed (and, from a peer
covered by a manifest, matched its SHA-256 pieces). The whole object's checksum (CRC, MD5) is
known only after its last byte: a mismatch then raises :class:`IntegrityError` from the
iterator, after some of that object's tensors were handed over. Use the tensors only when the
iteration ended without an error (vLLM does: its start fails). No refetch after hand-over:
``verify_passes`` is 0 here, and ``verify="full"`` (which rereads every byte after the last)
is refused."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import inspect
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from spotstart.errors import IntegrityError, InvalidCheckpoint, UsageError
from spotstart.fetch import FetchConfig, ProgressListener
from spotstart.fetch.plan import Chunk
from spotstart.fetch.scheduler import TransferFile, TransferScheduler
from spotstart.fetch.target import DiskTarget, Window
from spotstart.fetch.verify import CrcAlgorithm
from spotstart.fetch.writer import DiskWriter
from spotstart.weights import format as fmt
from spotstart.weights.loader import (
    Loader,
    LoadReport,
    TensorMemoryTarget,
    _Shard,
    _torch,
    record_load,
    torch_dtype,
)

if TYPE_CHECKING:
    import torch

DEFAULT_WINDOW_BYTES = 512 << 20
LOCAL_BATCH_BYTES = 32 << 20  # one preadv of consecutive tensors from a local copy
_P = ParamSpec("_P")
_S = TypeVar("_S")


@dataclass(eq=False)
class _Slot:
    """One tensor's memory while the stream holds it."""

    spec: fmt.TensorSpec
    display: str
    flat: Any = None  # torch uint8 tensor, allocated at admission
    view: Any = None  # its numpy view (the landing memory)
    pending: set[int] = field(default_factory=set)  # chunks not landed yet
    emitted: bool = False
    taken: bool = False
    hashed: bool = True  # False while an in-order MD5 still has to read it
    released: bool = False


class _Budget:
    """The stream's memory account and its admission queue (first come, first admitted: a
    later chunk never overtakes an earlier one, so the tensor the head waits for always
    completes)."""

    def __init__(self, window_bytes: int) -> None:
        self.window = window_bytes
        self.held = 0
        self.peak = 0
        self._queue: deque[tuple[asyncio.Future[None], Callable[[], bool]]] = deque()

    def allocate(self, n: int) -> None:
        self.held += n
        self.peak = max(self.peak, self.held)

    def free(self, n: int) -> None:
        self.held -= n
        self.pump()

    async def admit(self, check: Callable[[], bool]) -> None:
        """Wait until ``check()`` (which allocates when it says yes) passes at the head."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((fut, check))
        self.pump()
        try:
            await fut
        except asyncio.CancelledError:
            with contextlib.suppress(ValueError):
                self._queue.remove((fut, check))
            self.pump()
            raise

    def pump(self) -> None:
        while self._queue:
            fut, check = self._queue[0]
            if fut.done():
                self._queue.popleft()
                continue
            try:
                ok = check()
            except BaseException as exc:
                self._queue.popleft()
                fut.set_exception(exc)
                continue
            if not ok:
                return
            self._queue.popleft()
            fut.set_result(None)


class _StreamTarget(TensorMemoryTarget):
    """One remote shard: its tensors' memory, allocated chunk by chunk as the scheduler
    admits them, handed to the stream as each tensor completes. A FileTarget, and the
    scheduler's ChunkHooks for its file."""

    def __init__(
        self,
        stream: _Stream,
        shard: _Shard,
        file: TransferFile,
        writer: DiskWriter,
        disk: DiskTarget | None,
    ) -> None:
        assert shard.header is not None
        super().__init__(writer, shard.header, disk, shard.prefix)
        self.stream = stream
        self.file = file
        self.slots = [_Slot(spec, file.display) for spec in shard.header.tensors]
        self._ends = [s.spec.file_end for s in self.slots]  # ascending: the tensors tile
        self.by_chunk: dict[int, list[_Slot]] = {}
        self._hashed_upto = 0  # an in-order hash has read this far (its thread's view)
        self._hashed_applied = 0  # ... and the loop knows it
        self._loop = asyncio.get_running_loop()

    # -- the stream's side --------------------------------------------------------------
    def _plan(self) -> None:
        """Which tensors each chunk carries (the chunk plan is final when the file opens)."""
        self.by_chunk = {}
        i = 0
        slots = [s for s in self.slots if s.spec.nbytes]
        for ch in self.file.chunks:
            end = ch.start + ch.length
            while i < len(slots) and slots[i].spec.file_end <= ch.start:
                i += 1
            j, touched = i, []
            while j < len(slots) and slots[j].spec.file_begin < end:
                touched.append(slots[j])
                slots[j].pending.add(ch.index)
                j += 1
            self.by_chunk[ch.index] = touched

    async def admit(self, chunk: Chunk) -> None:
        ch = chunk
        touched = self.by_chunk.get(ch.index, [])
        budget = self.stream.budget

        def check() -> bool:
            if any(s.emitted for s in touched):
                raise IntegrityError(
                    f"{self.file.display}: bytes {ch.start}-{ch.start + ch.length - 1} must "
                    "be read again after their tensors were handed over (the object's check "
                    "failed, or a peer's bytes did); the load fails: rerun it"
                )
            new = [s for s in touched if s.flat is None]
            need = sum(s.spec.nbytes for s in new)
            mine = sum(s.spec.nbytes for s in touched if s.flat is not None and not s.released)
            if budget.held + need > budget.window and budget.held - mine > 0:
                return False
            for s in new:
                self.stream.allocate(s)
            return True

        await budget.admit(check)

    def landed(self, index: int) -> None:
        for s in self.by_chunk.get(index, ()):
            s.pending.discard(index)
            if not s.pending and not s.emitted:
                self._emit(s)

    def _emit(self, s: _Slot) -> None:
        s.hashed = (
            self.disk is not None
            or self.file.md5 is None
            or s.spec.file_end <= self._hashed_applied
        )
        self.stream.emit(s)

    # -- FileTarget ---------------------------------------------------------------------
    def open(self) -> dict[int, int]:
        done = super().open()
        self._plan()
        for s in self.slots:
            if not s.spec.nbytes:
                self.stream.allocate(s)
                self._emit(s)
        return done

    def _copy(self, offset: int, pieces: list[bytes]) -> None:
        import numpy as np

        pos = offset
        for piece in pieces:
            src = np.frombuffer(piece, dtype=np.uint8)
            for s, lo, hi in self._spans(pos, len(piece)):
                s.view[lo - s.spec.file_begin : hi - s.spec.file_begin] = src[lo - pos : hi - pos]
            pos += len(piece)

    def _spans(self, offset: int, length: int) -> Iterator[tuple[_Slot, int, int]]:
        """(slot, lo, hi): the file bytes ``[lo, hi)`` of ``[offset, offset+length)`` that
        belong to each tensor, in order (header bytes have none)."""
        end = offset + length
        for s in self.slots[bisect.bisect_right(self._ends, offset) :]:
            lo, hi = max(offset, s.spec.file_begin), min(end, s.spec.file_end)
            if hi > lo:
                yield s, lo, hi
            elif s.spec.file_begin >= end:
                break

    def window(
        self, offset: int, length: int, algorithm: CrcAlgorithm, *, reread: bool = False
    ) -> Window | None:
        if length <= 0:
            return None
        segments: list[memoryview] = []
        skip = min(length, max(0, self.header.data_start - offset))
        if skip:
            segments.append(memoryview(bytearray(skip)))
        for s, lo, hi in self._spans(offset, length):
            assert s.view is not None, "a chunk lands only after its admission"
            base = s.spec.file_begin
            segments.append(memoryview(s.view)[lo - base : hi - base])
        return self.landing(offset, segments)

    def read(self, offset: int, length: int) -> bytes:
        """Bytes for an in-order MD5 (or a recheck): from the cache copy when there is one,
        else from tensors the stream still holds."""
        if self.disk is not None:
            return self.disk.read(offset, length)
        out = bytearray(self.header_bytes(offset, length))
        for s, lo, hi in self._spans(offset, length):
            if s.view is None:
                raise IntegrityError(
                    f"{self.file.display}: its bytes were handed over before they could be "
                    "checked again; the load fails: rerun it"
                )
            out += s.view[lo - s.spec.file_begin : hi - s.spec.file_begin].tobytes()
        if offset <= self._hashed_upto < offset + length:
            self._hashed_upto = offset + length
            self._loop.call_soon_threadsafe(self._hashed, offset + length)
        return bytes(out)

    def _hashed(self, upto: int) -> None:
        self._hashed_applied = max(self._hashed_applied, upto)
        for s in self.slots:
            if s.spec.file_end > upto:
                break
            if not s.hashed:
                s.hashed = True
                self.stream.maybe_release(s)

    def finish(self) -> None:
        super().finish()
        self._loop.call_soon_threadsafe(self._hashed, self.stored_size())


_END = object()


class _Stream:
    """The producer: resolves the checkpoint as ``load`` does, runs the transfer, and queues
    each tensor as it completes."""

    def __init__(self, loader: Loader, window_bytes: int) -> None:
        if window_bytes <= 0:
            raise UsageError(f"window_bytes must be positive, not {window_bytes}")
        if loader.config.verify == "full":
            raise UsageError(
                "verify='full' rereads every byte after the last one lands; a stream holds "
                "one window of the model: use verify='auto' (or spotstart.load)"
            )
        self.loader = loader
        # Nothing can be refetched once handed over: a failed check fails at once.
        loader.config = dataclasses.replace(loader.config, verify_passes=0)
        self.budget = _Budget(window_bytes)
        self.ready: asyncio.Queue[Any] = asyncio.Queue()
        self.report: LoadReport | None = None
        self.tensors = 0

    def allocate(self, s: _Slot) -> None:
        th = _torch()
        s.flat = th.empty(s.spec.nbytes, dtype=th.uint8)
        s.view = s.flat.numpy()
        self.budget.allocate(s.spec.nbytes)

    def emit(self, s: _Slot) -> None:
        s.emitted = True
        spec = s.spec
        tensor = s.flat.view(torch_dtype(spec.dtype)).reshape(spec.shape)
        self.tensors += 1
        self.ready.put_nowait((spec.name, tensor, s))

    def taken(self, s: _Slot) -> None:
        s.taken = True
        self.maybe_release(s)

    def maybe_release(self, s: _Slot) -> None:
        if s.taken and s.hashed and not s.released:
            s.released = True
            s.flat = s.view = None
            self.budget.free(s.spec.nbytes)

    async def run(self) -> None:
        try:
            await self._run()
        except BaseException as exc:
            self.ready.put_nowait(exc)
            raise
        self.ready.put_nowait(_END)

    async def _run(self) -> None:
        started = time.time()
        report = await self.loader._with_shards(self._load)
        record_load(started, report, "streamed to")
        self.report = report

    async def _load(
        self,
        scheduler: TransferScheduler,
        shards: list[_Shard],
        index: fmt.ShardIndex | None,
    ) -> LoadReport:
        ld = self.loader
        cache, local, total = await ld._prepare(scheduler, shards, index)
        ld.progress.on_start(files_total=len(shards), bytes_total=total, bytes_done=0)
        from_disk = [s for s in shards if local[s.rel] is not None]
        # Local copies first, one after the other: they are fast, and the remote chunks'
        # admission then never waits behind a local read.
        for s in from_disk:
            path = local[s.rel]
            assert path is not None
            await self._read_local(s, path)
        remote = [s for s in shards if local[s.rel] is None]
        files = ld._plan_files(scheduler, remote, cache, self._make_target)
        await scheduler.transfer(files)
        return ld._report(scheduler, shards, files, from_disk, self.tensors, total)

    async def _read_local(self, shard: _Shard, path: Path) -> None:
        """A current local copy (a file:// source, or the cache): consecutive tensors read
        with one preadv each, batch by batch, each batch admitted like a chunk."""
        header = shard.header
        assert header is not None
        ld = self.loader
        slots = [_Slot(spec, str(path)) for spec in header.tensors]
        batches: list[list[_Slot]] = [[]]
        for s in slots:
            limit = min(LOCAL_BATCH_BYTES, self.budget.window)
            if batches[-1] and sum(x.spec.nbytes for x in batches[-1]) >= limit:
                batches.append([])
            batches[-1].append(s)
        fd = ld._open_local(path, shard.info.size)
        try:
            for batch in batches:
                need = sum(s.spec.nbytes for s in batch)

                def check(batch: list[_Slot] = batch, need: int = need) -> bool:
                    if self.budget.held and self.budget.held + need > self.budget.window:
                        return False
                    for s in batch:
                        self.allocate(s)
                    return True

                await self.budget.admit(check)
                await asyncio.to_thread(_preadv_exact, fd, path, batch)
                for s in batch:
                    self.emit(s)
        finally:
            os.close(fd)
        ld.progress.on_bytes(shard.info.size)
        ld.progress.on_file_done(shard.rel, cached=ld.url.scheme != "file")

    def _make_target(
        self, scheduler: TransferScheduler, shard: _Shard
    ) -> Callable[[TransferFile], _StreamTarget]:
        ld = self.loader

        def make(f: TransferFile) -> _StreamTarget:
            disk = ld._disk_target(scheduler, shard, f)
            target = _StreamTarget(self, shard, f, scheduler.writer, disk)
            f.hooks = target
            f.md5_in_order = disk is None and _md5_proves_peer_bytes(f, ld.config)
            return target

        return make


def _md5_proves_peer_bytes(f: TransferFile, config: FetchConfig) -> bool:
    """Peer bytes without a manifest are proven by the origin's MD5 over the whole object.
    Where the store also gives a CRC, the scheduler computes that MD5 from the landed bytes
    after the last one: a stream no longer holds them then, so it asks for it to be hashed
    in order as chunks land instead (where the scheduler does that anyway, nothing to ask)."""
    sums = f.info.checksums
    return (
        config.peers is not None
        and config.verify == "auto"
        and f.peer_id is not None
        and f.manifest is None
        and f.md5 is None
        and sums.crc is not None
        and (sums.md5 is not None or (sums.md5_of_parts is not None and bool(f.info.parts)))
    )


def _preadv_exact(fd: int, path: Path, batch: list[_Slot]) -> None:
    views = [memoryview(s.view) for s in batch if s.spec.nbytes]
    if not views:
        return
    at = batch[0].spec.file_begin
    while views:
        got = os.preadv(fd, views[:1024], at)
        if got <= 0:
            raise InvalidCheckpoint(f"{path}: shorter than its header says (truncated)")
        at += got
        while views and got >= views[0].nbytes:
            got -= views[0].nbytes
            views.pop(0)
        if got:
            views[0] = views[0][got:]


class AsyncTensorStream:
    """``async for name, tensor in stream``: the tensors of a checkpoint as they arrive (see
    the module docstring for memory and checks). ``report`` (a :class:`LoadReport`) is set
    when the iteration ended; ``bytes_held_peak`` is the peak of the tensor memory the stream
    held. Stopping early: ``await stream.aclose()`` (or ``async with``) cancels the transfer
    and closes its connections."""

    def __init__(self, loader: Loader, window_bytes: int = DEFAULT_WINDOW_BYTES) -> None:
        self._stream = _Stream(loader, window_bytes)  # refuses bad settings here
        self._loader = loader
        self._task: asyncio.Task[None] | None = None
        self._done = False

    @property
    def report(self) -> LoadReport | None:
        return self._stream.report

    @property
    def bytes_held_peak(self) -> int:
        return self._stream.budget.peak

    def __aiter__(self) -> AsyncTensorStream:
        return self

    async def __anext__(self) -> tuple[str, torch.Tensor]:
        name, tensor, slot = await self.next_item()
        self.release(slot)
        return name, tensor

    async def next_item(self) -> tuple[str, torch.Tensor, Any]:
        """The next tensor and its slot, kept by the stream until :meth:`release`."""
        if self._done:
            raise StopAsyncIteration
        if self._task is None:
            self._task = asyncio.create_task(self._stream.run())
        item = await self._stream.ready.get()
        if item is _END:
            self._done = True
            assert self._task is not None
            await self._task
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._done = True
            await self.aclose()
            raise item
        name, tensor, slot = item
        device = self._loader.device
        if device.type != "cpu":
            tensor = tensor.to(device)
        return name, tensor, slot

    def release(self, slot: Any) -> None:
        """The consumer has the tensor of ``slot``: its memory no longer counts here."""
        self._stream.taken(slot)

    async def aclose(self) -> None:
        self._done = True
        task = self._task
        if task is not None and not task.done():
            task.cancel()
        if task is not None:
            with contextlib.suppress(BaseException):
                await task

    async def __aenter__(self) -> AsyncTensorStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class _Pump:
    """The stream thread's side of a :class:`TensorStream`: runs the async stream on its own
    event loop and queues each item for the consumer."""

    def __init__(self, inner: AsyncTensorStream) -> None:
        self.inner = inner
        self.items: queue.Queue[Any] = queue.Queue()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task[None] | None = None
        self.started = threading.Event()

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()
        self.started.set()
        try:
            while True:
                self.items.put(await self.inner.next_item())
        except StopAsyncIteration:
            self.items.put(_END)
        except asyncio.CancelledError:
            self.items.put(_END)
        except BaseException as exc:
            self.items.put(exc)
        finally:
            await self.inner.aclose()


class TensorStream:
    """``for name, tensor in stream``: :class:`AsyncTensorStream` run on a thread of its own
    (with its own event loop), so the transfer goes on while the consumer works on a tensor.
    A tensor counts against the window until the consumer has taken it. ``close()`` (or
    ``with``) stops early: the transfer is cancelled and the thread joined."""

    def __init__(self, loader: Loader, window_bytes: int = DEFAULT_WINDOW_BYTES) -> None:
        self._inner = AsyncTensorStream(loader, window_bytes)
        # The thread holds the pump, never this object: a stream dropped unclosed is
        # collected, and __del__ stops its transfer (else the thread kept it alive for ever).
        self._pump = _Pump(self._inner)
        self._items = self._pump.items
        self._finished = False
        self._thread = threading.Thread(target=self._pump.run, name="spotstart-stream", daemon=True)
        self._thread.start()
        self._pump.started.wait()

    @property
    def report(self) -> LoadReport | None:
        return self._inner.report

    @property
    def bytes_held_peak(self) -> int:
        return self._inner.bytes_held_peak

    def __iter__(self) -> TensorStream:
        return self

    def __next__(self) -> tuple[str, torch.Tensor]:
        if self._finished:
            raise StopIteration
        item = self._items.get()
        if isinstance(item, BaseException):
            self._finished = True
            self._thread.join()
            raise item
        if item is _END:
            self._finished = True
            self._thread.join()
            raise StopIteration
        name, tensor, slot = item
        loop = self._pump.loop
        assert loop is not None
        with contextlib.suppress(RuntimeError):  # the loop ended: nothing left to account
            loop.call_soon_threadsafe(self._inner.release, slot)
        return name, tensor

    def close(self) -> None:
        """Stop: cancel the transfer, close its connections, join the thread."""
        if self._finished:
            return
        self._finished = True
        loop, task = self._pump.loop, self._pump.task
        if loop is not None and task is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(task.cancel)
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def __enter__(self) -> TensorStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _options(
    src: str,
    *,
    device: str = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
    config: FetchConfig | None = None,
    progress: ProgressListener | None = None,
    window_bytes: int = DEFAULT_WINDOW_BYTES,
) -> tuple[Loader, int]:
    """The one signature of :func:`iter_tensors` and :func:`aiter_tensors`."""
    return Loader(src, device, None, cache_dir, config, progress), window_bytes


def _opener(
    options: Callable[_P, tuple[Loader, int]],
    stream: Callable[[Loader, int], _S],
    name: str,
    doc: str,
) -> Callable[_P, _S]:
    """A function ``name`` with the signature of ``options``, that opens a ``stream``: one
    signature for the sync and the async form, none written twice."""

    def open_stream(*args: _P.args, **kwargs: _P.kwargs) -> _S:
        return stream(*options(*args, **kwargs))

    open_stream.__name__ = open_stream.__qualname__ = name
    open_stream.__doc__ = doc
    sig = inspect.signature(options).replace(return_annotation=stream.__name__)
    open_stream.__signature__ = sig  # type: ignore[attr-defined]  # help() shows the arguments
    return open_stream


iter_tensors = _opener(
    _options,
    TensorStream,
    "iter_tensors",
    """The tensors of a safetensors checkpoint (one file, an index, or a prefix: what
    :func:`spotstart.load` takes) as ``(name, tensor)`` pairs, each handed over as soon as
    its bytes have arrived: ``iter_tensors(src, *, device="cpu", cache_dir=None,
    config=None, progress=None, window_bytes=512 MiB) -> TensorStream``. Tensor memory held
    at once: at most ``max(window_bytes, chunk_bytes + 2 * largest tensor)`` (see
    :mod:`spotstart.weights.stream`), plus ``FetchConfig``'s transfer bounds. A failed object
    check raises from the iterator: use what it gave only once it ended without error.

    Example::

        with spotstart.iter_tensors("gs://my-models/llama-3-8b/") as stream:
            for name, tensor in stream:
                model.get_parameter(name).copy_(tensor)
        print(stream.report)
    """,
)
aiter_tensors = _opener(
    _options,
    AsyncTensorStream,
    "aiter_tensors",
    """:func:`iter_tensors` for ``async for`` (on the caller's event loop), with the same
    arguments: ``aiter_tensors(src, ...) -> AsyncTensorStream``.""",
)


__all__ = ["AsyncTensorStream", "TensorStream", "aiter_tensors", "iter_tensors"]
