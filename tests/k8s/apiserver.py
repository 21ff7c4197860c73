"""kmock's Kubernetes emulator with the API-server behaviour a controller's correctness rests
on, added the way kmock's docs invite (inherit and implement): every write gets a new
``metadata.resourceVersion`` (and a creation time), and a write that carries a stale
resourceVersion is refused with ``409 Conflict``, the optimistic concurrency that makes leader
election safe. Everything else (objects, lists, watch streams, the DSL to inject faults) is
kmock's own, served over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime
from typing import Any

import aiohttp.web
from kmock import KubernetesEmulator, Request, action


def status(code: int, reason: str, message: str) -> aiohttp.web.Response:
    return aiohttp.web.json_response(
        {
            "apiVersion": "v1",
            "kind": "Status",
            "metadata": {},
            "status": "Failure",
            "code": code,
            "reason": reason,
            "message": message,
        },
        status=code,
    )


class ApiServer(KubernetesEmulator):  # type: ignore[misc]
    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._versions = itertools.count(1000)
        self._writes = asyncio.Lock()

    async def _serve_list(self, request: Request) -> Any:
        listing = await super()._serve_list(request)
        # a real list carries the collection's version, where a watch resumes from
        listing["metadata"]["resourceVersion"] = str(next(self._versions))
        return listing

    def version_of(self, key: tuple[Any, str | None, str | None]) -> str | None:
        if key not in self.objects or self.objects[key].deleted:
            return None
        return str(self.objects[key].raw.get("metadata", {}).get("resourceVersion") or "")

    async def _handle(self, request: Request) -> aiohttp.web.StreamResponse:
        write = request.resource is not None and request.action in (
            action.CREATE,
            action.UPDATE,
        )
        if not write or not isinstance(request.data, dict):
            return await super()._handle(request)
        async with self._writes:  # check-and-write is atomic, as etcd makes it
            meta = request.data.setdefault("metadata", {})
            if request.action == action.UPDATE:
                key = (request.resource, request.namespace, request.name)
                wanted = meta.get("resourceVersion")
                have = self.version_of(key)
                if wanted and have is not None and str(wanted) != have:
                    return status(
                        409,
                        "Conflict",
                        f"the object has been modified; resourceVersion {wanted} != {have}",
                    )
            else:
                meta.setdefault(
                    "creationTimestamp", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                )
            meta["resourceVersion"] = str(next(self._versions))
            return await super()._handle(request)
