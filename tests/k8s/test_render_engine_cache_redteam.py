"""Red team: `engine_cache:` values the render accepts must give a guard command line the
guard accepts (a pod whose guard exits 2 crash-loops, every replica, until the config changes)."""

from __future__ import annotations

import pytest

from spotstart.k8s import CLOUDS
from tests.k8s.test_render import model_pods, validate_core
from tests.k8s.test_render_engine_cache import guard_args, objs_of, server_of


@pytest.mark.parametrize("kcloud", CLOUDS)
def test_key_extras_that_look_like_options_reach_the_guard_as_values(kcloud: str) -> None:
    # "what the key cannot see": an engine flag is the natural thing to write here; before,
    # `--engine-cache-key-extra --enforce-eager` was rendered and argparse refused it
    # ("expected one argument"): the guard exited 2 in every pod
    extras = ["--enforce-eager", "-O3", "rev 7", "a=b"]
    objs = objs_of({"engine_cache": {"url": "gs://b/engine-cache", "key_extra": extras}}, kcloud)
    validate_core(objs)
    for pod in model_pods(objs, "m"):
        args = guard_args(server_of(pod))
        assert args.engine_cache_key_extra == extras
        assert args.server == ["--", "serve"]
