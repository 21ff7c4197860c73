"""An in-memory :class:`RangeSource` for pure tests of the fetch engine, with scriptable
failures (like httpx's MockTransport / obstore's MemoryStore). Not for production use."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import google_crc32c

from spotstart.errors import NotFound, ObjectChanged, TransientError
from spotstart.store.base import Checksums, ObjectInfo, Sink

# A fault hook sees (key, start, length, attempt) and may raise or return replacement bytes.
FaultHook = Callable[[str, int, int, int], bytes | None]


class MemorySource:
    """Objects held in a dict. ``fault`` lets a test fail or corrupt chosen reads."""

    def __init__(
        self,
        objects: dict[str, bytes],
        *,
        fault: FaultHook | None = None,
        checksums: bool = True,
        name: str = "mem",
    ) -> None:
        self.objects = dict(objects)
        self.fault = fault
        self.checksums = checksums
        self.name = name
        self.reads: list[tuple[str, int, int]] = []
        self._attempts: dict[tuple[str, int], int] = {}

    @property
    def display(self) -> str:
        return f"memory://{self.name}"

    def _info(self, key: str) -> ObjectInfo:
        data = self.objects[key]
        sums = (
            Checksums(google_crc32c.value(data), hashlib.md5(data).digest())
            if self.checksums
            else Checksums()
        )
        return ObjectInfo(key, len(data), hashlib.sha1(data).hexdigest()[:16], sums)

    async def stat(self, key: str) -> ObjectInfo:
        if key not in self.objects:
            raise NotFound(f"{self.display}/{key}: not found")
        return self._info(key)

    async def list(self, prefix: str) -> list[ObjectInfo]:
        return [self._info(k) for k in sorted(self.objects) if k.startswith(prefix)]

    async def read(self, obj: ObjectInfo, start: int, length: int, sink: Sink) -> None:
        if obj.key not in self.objects or self._info(obj.key).version != obj.version:
            raise ObjectChanged(f"{self.display}/{obj.key}: changed")
        attempt = self._attempts.get((obj.key, start), 0)
        self._attempts[(obj.key, start)] = attempt + 1
        self.reads.append((obj.key, start, length))
        data = self.objects[obj.key][start : start + length]
        if self.fault is not None:
            replaced = self.fault(obj.key, start, length, attempt)
            if replaced is not None:
                data = replaced
        for i in range(0, len(data), 1 << 20):
            await sink(data[i : i + (1 << 20)])
        if len(data) < length:
            raise TransientError(f"{self.display}/{obj.key}: short body")

    async def close(self) -> None:
        return None
