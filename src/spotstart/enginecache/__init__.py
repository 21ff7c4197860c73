"""The engine's compile caches (vLLM, torch inductor, Triton, FlashInfer) keyed, packed, published
to a bucket and restored on the next start, so a warm start skips the compile.

    cfg = EngineCacheConfig(url="s3://bucket/engine-cache", root=Path("/nvme/engine-cache"))
    env = os.environ | engine_env(cfg, argv)
    key = await compute_key(cfg, argv, env)
    outcome = await restore(cfg, key)             # hit | miss | failed (then: cold start)
    ... start the server with env; after its first ready on a miss:
    await publish(cfg, key)                        # published | exists | skipped | failed
"""

from __future__ import annotations

from spotstart.enginecache.config import CacheKey, EngineCacheConfig, Outcome
from spotstart.enginecache.dirs import archives_dir, engine_env
from spotstart.enginecache.key import compute_key, explain
from spotstart.enginecache.remote import publish, restore

__all__ = [
    "CacheKey",
    "EngineCacheConfig",
    "Outcome",
    "archives_dir",
    "compute_key",
    "engine_env",
    "explain",
    "publish",
    "restore",
]
