"""The guard's side of ``--engine-cache``: the server's cache env, the key, the restore before
the server starts and the one publish after its first ready. What is cached, the key and the
checks are :mod:`spotstart.enginecache`'s; this only sequences them around the server and says
what happened (log lines, metrics). A cache never stops a start: any trouble starts cold."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence

from spotstart.enginecache import (
    CacheKey,
    EngineCacheConfig,
    Outcome,
    compute_key,
    engine_env,
    publish,
    restore,
)
from spotstart.errors import SpotstartError
from spotstart.guard.metrics import GuardMetrics

log = logging.getLogger("spotstart.guard")

MB = 1e6
# The most the restore may hold the server's start: the fetch alone has no overall bound (a
# read may go 20 s without a byte, 8 attempts with backoff; a trickle never stalls), and a
# spot replacement is needed now. Vendors' cold engine starts are 33-327 s: a restore
# slower than 10 minutes is never worth waiting for.
RESTORE_TIMEOUT_S = 600.0


class WarmStart:
    """One server start with an engine cache. ``restore`` before the server starts (cancelled
    by the guard when a notice comes first), ``publish_soon`` once it is ready (a background
    task; ``cancel_publish`` on a notice: the manifest is written last, so a publish cut
    anywhere leaves nothing a restore would take)."""

    def __init__(
        self,
        config: EngineCacheConfig,
        argv: Sequence[str],
        metrics: GuardMetrics,
        restore_timeout_s: float | None = RESTORE_TIMEOUT_S,
    ) -> None:
        self.config = config
        self.restore_timeout_s = restore_timeout_s
        self.argv = tuple(argv)
        self.metrics = metrics
        self.key: CacheKey | None = None
        self.restored: Outcome | None = None
        self.published: Outcome | None = None
        self._publish: asyncio.Task[None] | None = None

    def server_env(self, base: Mapping[str, str]) -> dict[str, str]:
        """``base`` with every cache directory of the engine pointed beneath the cache root."""
        return {**base, **engine_env(self.config, self.argv)}

    @property
    def warm(self) -> bool:
        return self.restored is not None and self.restored.status == "hit"

    @property
    def outcome(self) -> str:
        """The restore's outcome for events and logs ("none" before one ended)."""
        return self.restored.status if self.restored is not None else "none"

    async def restore(self, env: Mapping[str, str]) -> Outcome:
        """Compute the key and restore the cache for it; never raises but CancelledError."""
        began = time.monotonic()
        log.info("engine cache: restoring from %s before the server starts", self.config.url)
        try:
            self.key = await compute_key(self.config, self.argv, env)
            outcome = await asyncio.wait_for(restore(self.config, self.key), self.restore_timeout_s)
        except asyncio.CancelledError:
            raise
        except TimeoutError:  # restore's own cleanup ran: the cache dirs are left empty
            outcome = Outcome(
                "failed",
                f"not restored within {self.restore_timeout_s:g} s "
                "(--engine-cache-restore-timeout)",
                0,
                0,
                time.monotonic() - began,
            )
        except Exception as exc:  # a cache never stops a start: cold, and say why
            log.error(
                "engine cache: %s failed: %s: %s",
                "the cache key" if self.key is None else "the restore",
                type(exc).__name__,
                exc,
                exc_info=not isinstance(exc, (OSError, SpotstartError)),  # a bug: its trace
            )
            outcome = Outcome("failed", f"{type(exc).__name__}: {exc}", 0, 0, 0.0)
        seconds = outcome.seconds or (time.monotonic() - began)
        self.restored = outcome
        key = self.key.digest[:16] if self.key is not None else "(none)"
        if outcome.status == "hit":
            log.info(
                "engine cache: restored %d files, %.1f MB in %.2f s for key %s: starting warm",
                outcome.files,
                outcome.bytes / MB,
                seconds,
                key,
            )
        elif outcome.status == "miss":
            log.warning("engine cache: miss for key %s, starting cold", key)
        else:
            log.warning(
                "engine cache: restore %s for key %s (%s), starting cold",
                outcome.status,
                key,
                outcome.reason or "no reason given",
            )
        self.metrics.engine_cache_restores.labels(outcome.status).inc()
        self.metrics.engine_cache_restore_seconds.set(seconds)
        self.metrics.engine_cache_restore_bytes.set(outcome.bytes if outcome.status == "hit" else 0)
        return outcome

    def publish_soon(self) -> bool:
        """After the server's first ready: publish in the background what it wrote, when the
        restore was not a hit and publishing is on. True when a publish started."""
        if self._publish is not None or self.warm or self.key is None:
            return False
        if not self.config.publish:
            log.info("engine cache: --engine-cache-no-publish: not publishing")
            self.metrics.engine_cache_publishes.labels("skipped").inc()
            return False
        self._publish = asyncio.create_task(self._run_publish(self.key))
        return True

    async def _run_publish(self, key: CacheKey) -> None:
        log.info("engine cache: publishing what the server compiled, key %s", key.digest[:16])
        try:
            outcome = await publish(self.config, key)
        except asyncio.CancelledError:
            log.warning(
                "engine cache: publish cancelled by the notice; nothing was made visible "
                "(the manifest is written last)"
            )
            self.metrics.engine_cache_publishes.labels("cancelled").inc()
            raise
        except Exception as exc:  # never the server's or the drain's problem
            log.error(
                "engine cache: publish failed: %s: %s",
                type(exc).__name__,
                exc,
                exc_info=not isinstance(exc, (OSError, SpotstartError)),
            )
            self.metrics.engine_cache_publishes.labels("failed").inc()
            return
        self.published = outcome
        self.metrics.engine_cache_publishes.labels(outcome.status).inc()
        if outcome.status == "published":
            log.info(
                "engine cache: published %d files, %.1f MB in %.2f s",
                outcome.files,
                outcome.bytes / MB,
                outcome.seconds,
            )
        elif outcome.status == "exists":
            log.info("engine cache: another replica published this key first; kept theirs")
        else:
            log.warning("engine cache: publish %s (%s)", outcome.status, outcome.reason)

    @property
    def publishing(self) -> bool:
        return self._publish is not None and not self._publish.done()

    async def cancel_publish(self) -> None:
        """Stop a publish still packing or uploading (a notice: the node is going)."""
        task = self._publish
        if task is None or task.done():
            return
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
