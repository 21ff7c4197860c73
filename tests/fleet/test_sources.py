"""`spotstart plan` reading traces from URLs: a real nginx on 127.0.0.1 stands in for the public
spot-traces repository (and for a hostile server); the CLI runs as a subprocess, as a user runs
it. What a server may send is bounded (size, JSON, paths); a rerun reads the cache."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]

from spotstart.emulate.crosscheck import Nginx
from spotstart.errors import IntegrityError, SpotstartError
from spotstart.fleet import ConfigError
from spotstart.fleet.sources import TraceSource, cache_root, trace_relpath
from spotstart.fleet.traces import MAX_TRACE_BYTES
from tests.conftest import Store, error_line, run_cli

EXAMPLE = Path(__file__).resolve().parents[2] / "src" / "spotstart" / "examples" / "fleet.yaml"
AWS = "availability/1-node/aws-02-15-2023"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Nginx]:
    """A server of this test's own (tests stop it)."""
    n = Nginx(tmp_path / "nginx")
    n.start()
    try:
        yield n
    finally:
        n.stop()


def trace_bytes(data: list[int], gap: int = 60) -> bytes:
    return json.dumps({"metadata": {"gap_seconds": gap}, "data": data}).encode()


def small_config(tmp_path: Path, zones: list[dict[str, Any]], **top: Any) -> Path:
    cfg = tmp_path / "fleet.yaml"
    doc = {"zones": zones, "target": {"replicas": 1}, "policies": ["on_demand", "spot_spread"]}
    doc.update(top)
    cfg.write_text(yaml.safe_dump(doc))
    return cfg


def plan_json(cfg: Path, traces: str, cache: Path, *extra: str) -> tuple[int, Any, str]:
    r = run_cli(
        ["plan", "run", "--config", str(cfg), "--traces-dir", traces, "--json", *extra],
        env={"SPOTSTART_CACHE_DIR": str(cache)},
        timeout_s=300,
    )
    return r.code, (json.loads(r.stdout) if r.code == 0 else None), r.stderr


def test_the_example_plan_from_an_http_copy_of_the_public_traces_equals_the_local_one(
    traces_dir: Path, server: Nginx, tmp_path: Path
) -> None:
    files = sorted((traces_dir / AWS).glob("*.json"))
    assert len(files) == 9
    server.seed({f"spot-traces/{AWS}/{f.name}": f.read_bytes() for f in files})
    cache = tmp_path / "cache"
    url = f"{server.endpoint}/spot-traces"
    code, remote, err = plan_json(EXAMPLE, url, cache, "--no-optimal")
    assert code == 0, err
    code, local, err = plan_json(EXAMPLE, str(traces_dir), cache, "--no-optimal")
    assert code == 0, err
    assert remote["runs"] == local["runs"]
    by_policy = {r["policy"]: r for r in remote["runs"]}
    assert by_policy["on_demand"]["cost_relative"] == 1.0
    assert 0 < by_policy["warm_hedge"]["cost_relative"] < 1
    assert by_policy["warm_hedge"]["availability"] > 0.99
    # the fetched copies, in the cache, are the files (and match the config's sha256 pins)
    cached = sorted(cache.rglob("*_v100_1.json"))
    assert [p.name for p in cached] == [f.name for f in files]
    for c, f in zip(cached, files, strict=True):
        assert c.read_bytes() == f.read_bytes()


def two_zones(tmp_path: Path, server: Nginx) -> Path:
    server.seed(
        {
            "t/a/one.json": trace_bytes([1, 1, 0, 1] * 30),
            "t/a/two.json": trace_bytes([1, 0, 0, 1] * 30),
        }
    )
    return small_config(
        tmp_path,
        [{"name": "one", "trace": "a/one.json"}, {"name": "two", "trace": "a/two.json"}],
    )


def test_a_rerun_reads_the_cache_and_offline_uses_what_was_fetched(
    server: Nginx, tmp_path: Path
) -> None:
    cfg = two_zones(tmp_path, server)
    cache = tmp_path / "cache"
    url = f"{server.endpoint}/t/"
    code, first, err = plan_json(cfg, url, cache, "--no-optimal")
    assert code == 0, err
    (copy,) = [p for p in cache.rglob("one.json")]
    before = os.stat(copy)
    code, again, err = plan_json(cfg, url, cache, "--no-optimal")
    assert code == 0, err
    after = os.stat(copy)
    # an unchanged object is not fetched again: the same file, not rewritten
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert again == first
    server.stop()
    code, offline, err = plan_json(cfg, url, cache, "--no-optimal")
    assert code == 0, err
    assert offline == first
    assert "unreachable" in err and "fetched from it before" in err
    # offline, a trace that is not in the cache is not made up: the connection error
    (two,) = [p for p in cache.rglob("two.json")]
    two.unlink()
    code, _, err = plan_json(cfg, url, cache, "--no-optimal")
    assert code == 5, err
    line = error_line(err)
    assert "zones[1] (two)" in line and "not fetched before" in line and "unreachable" in line
    # offline with nothing fetched before: the connection error, with its exit code
    code, _, err = plan_json(cfg, url, tmp_path / "empty-cache", "--no-optimal")
    assert code == 5, err
    assert "zones[0] (one)" in error_line(err) and "check traces_dir" in err


def test_a_changed_trace_at_the_source_is_fetched_again(server: Nginx, tmp_path: Path) -> None:
    cfg = two_zones(tmp_path, server)
    cache = tmp_path / "cache"
    code, first, err = plan_json(cfg, f"{server.endpoint}/t", cache, "--no-optimal")
    assert code == 0, err
    server.seed({"t/a/one.json": trace_bytes([0] * 120)})
    code, second, err = plan_json(cfg, f"{server.endpoint}/t", cache, "--no-optimal")
    assert code == 0, err
    spread = {r["policy"]: r for r in second["runs"]}["spot_spread"]
    assert spread != {r["policy"]: r for r in first["runs"]}["spot_spread"]
    (copy,) = [p for p in cache.rglob("one.json")]
    assert copy.read_bytes() == trace_bytes([0] * 120)


def test_a_missing_trace_is_a_clear_error_with_its_exit_code(server: Nginx, tmp_path: Path) -> None:
    server.seed({"t/a/one.json": trace_bytes([1] * 10)})
    cfg = small_config(
        tmp_path,
        [{"name": "one", "trace": "a/one.json"}, {"name": "gone", "trace": "a/gone.json"}],
    )
    code, _, err = plan_json(cfg, f"{server.endpoint}/t/", tmp_path / "cache", "--no-optimal")
    assert code == 3, err  # NotFound, as fetch reports it
    line = error_line(err)
    assert "zones[1] (gone)" in line and "a/gone.json" in line and "check traces_dir" in line
    # a local folder: the same mistake is a config error (exit 2)
    (tmp_path / "local" / "a").mkdir(parents=True)
    (tmp_path / "local" / "a" / "one.json").write_bytes(trace_bytes([1] * 10))
    code, _, err = plan_json(cfg, str(tmp_path / "local"), tmp_path / "cache", "--no-optimal")
    assert code == 2 and "trace file not found" in error_line(err), err


def test_a_trace_larger_than_the_limit_is_refused_before_it_is_fetched(
    server: Nginx, tmp_path: Path
) -> None:
    big = server.root / "t" / "big.json"
    big.parent.mkdir(parents=True)
    with big.open("wb") as f:  # sparse: the size a server claims, no disk spent
        f.truncate(MAX_TRACE_BYTES + 1)
    cfg = small_config(tmp_path, [{"name": "big", "trace": "big.json"}])
    cache = tmp_path / "cache"
    code, _, err = plan_json(cfg, f"{server.endpoint}/t/", cache, "--no-optimal")
    assert code == 2, err
    assert "more than the 64 MiB a trace may hold" in error_line(err)
    assert not list(cache.rglob("big.json"))
    # a local file that large is not read either
    code, _, err = plan_json(cfg, str(big.parent), cache, "--no-optimal")
    assert code == 2 and "larger than 64 MiB" in error_line(err), err


@pytest.mark.parametrize(
    "rel", ["../secret.json", "a/../../secret.json", "/etc/passwd", "./a.json", "a//b.json"]
)
def test_a_trace_path_must_stay_beneath_traces_dir(rel: str, server: Nginx, tmp_path: Path) -> None:
    server.seed({"secret.json": trace_bytes([1] * 10), "t/a.json": trace_bytes([1] * 10)})
    cfg = small_config(tmp_path, [{"name": "x", "trace": rel}])
    code, _, err = plan_json(cfg, f"{server.endpoint}/t/", tmp_path / "cache", "--no-optimal")
    assert code == 2, err
    assert "must be a relative path beneath traces_dir" in error_line(err)


def test_an_encoded_dot_dot_is_a_name_not_a_way_out(server: Nginx, tmp_path: Path) -> None:
    server.seed({"secret.json": trace_bytes([1] * 10), "t/x.json": trace_bytes([1] * 10)})
    cfg = small_config(tmp_path, [{"name": "x", "trace": "%2e%2e/secret.json"}])
    code, _, err = plan_json(cfg, f"{server.endpoint}/t/", tmp_path / "cache", "--no-optimal")
    assert code == 3, err  # asked for as /t/%252e%252e/secret.json: not there
    assert "%252e%252e/secret.json" in error_line(err)


def test_a_link_beneath_a_local_traces_dir_is_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside.json"
    outside.write_bytes(trace_bytes([1] * 10))
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.json").symlink_to(outside)
    with pytest.raises(ConfigError, match="no symbolic link followed"):
        TraceSource.at(tmp_path / "t", tmp_path).read("a.json", "zones[0]")


def test_hostile_json_from_the_server_is_a_config_error(server: Nginx, tmp_path: Path) -> None:
    server.seed(
        {
            "t/deep.json": b"[" * 100_000 + b"]" * 100_000,
            "t/huge-int.json": b'{"metadata": {"gap_seconds": 60}, "data": [' + b"9" * 30 + b"]}",
        }
    )
    for name, why in (("deep.json", "nested deeper"), ("huge-int.json", "non-negative integers")):
        cfg = small_config(tmp_path, [{"name": "x", "trace": name}])
        code, _, err = plan_json(cfg, f"{server.endpoint}/t/", tmp_path / "cache", "--no-optimal")
        assert code == 2 and why in error_line(err), err


def test_a_sha256_pin_refuses_other_bytes(server: Nginx, tmp_path: Path) -> None:
    data = trace_bytes([1, 0] * 20)
    server.seed({"t/a.json": data})
    good = hashlib.sha256(data).hexdigest()
    bad = hashlib.sha256(b"other").hexdigest()
    cache = tmp_path / "cache"
    for pin, want in ((good, 0), (bad, 6)):
        cfg = small_config(tmp_path, [{"name": "a", "trace": "a.json", "sha256": pin}])
        code, _, err = plan_json(cfg, f"{server.endpoint}/t/", cache, "--no-optimal")
        assert code == want, err
    assert "differs from the config's" in error_line(err)
    with pytest.raises(IntegrityError):
        TraceSource.at(tmp_path, tmp_path).read("fleet.yaml", "z", sha256=bad)


def test_the_example_config_pins_the_public_files_at_a_commit(traces_dir: Path) -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    assert doc["traces_dir"].startswith(
        "https://raw.githubusercontent.com/skypilot-org/spot-traces/"
    )
    commit = doc["traces_dir"].rsplit("/", 1)[-1]
    assert len(commit) == 40 and int(commit, 16) >= 0  # a commit, not a moving branch
    for z in doc["zones"]:
        data = (traces_dir / z["trace"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == z["sha256"], z["name"]


@pytest.mark.parametrize(
    ("rel", "ok"),
    [
        ("a.json", True),
        ("x/y/z.json", True),
        ("..json", True),
        ("..", False),
        ("a/../b", False),
        ("/a", False),
        ("a\\..\\b", False),
        ("", False),
        ("a/", False),
        ("a\0b", False),
    ],
)
def test_trace_relpath(rel: str, ok: bool) -> None:
    if ok:
        assert trace_relpath(rel, "z") == rel
    else:
        with pytest.raises(ConfigError, match=r"(beneath|relative to) traces_dir"):
            trace_relpath(rel, "z")


def test_cache_root_follows_the_environment(tmp_path: Path) -> None:
    assert cache_root({"SPOTSTART_CACHE_DIR": str(tmp_path)}) == tmp_path
    assert cache_root({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "spotstart"
    assert cache_root({}) == Path("~/.cache/spotstart").expanduser()


def test_a_file_url_is_read_in_place(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.json").write_bytes(trace_bytes([1, 1]))
    src = TraceSource.at(f"file://{tmp_path / 't'}", Path("/nowhere"))
    assert src.root == tmp_path / "t" and src.url is None  # read in place, not fetched
    assert src.read("a.json", "z")[0] == trace_bytes([1, 1])


def test_every_store_fetch_reads_serves_traces(store: Store, tmp_path: Path) -> None:
    """gs://, s3:// (three servers each way), http and https: the same bytes, cached."""
    data = trace_bytes([1, 0, 1, 1])
    store.seed({"traces/aws/a.json": data})
    src = TraceSource.at(store.url("traces"), tmp_path, cache=tmp_path / "cache")
    got, what = src.read("aws/a.json", "zones[0]", hashlib.sha256(data).hexdigest())
    assert got == data and what == store.url("traces/aws/a.json")
    assert [p.read_bytes() for p in (tmp_path / "cache").rglob("a.json")] == [data]
    with pytest.raises(SpotstartError) as missing:
        src.read("aws/gone.json", "zones[1]")
    assert missing.value.exit_code == 3 and "zones[1]" in str(missing.value)


def test_a_cache_others_may_write_is_refused_before_anything_is_fetched(
    server: Nginx, tmp_path: Path
) -> None:
    server.seed({"t/a.json": trace_bytes([1, 1])})
    cache = tmp_path / "cache"
    (cache / "traces").mkdir(parents=True)
    (cache / "traces").chmod(0o777)
    cfg = small_config(tmp_path, [{"name": "a", "trace": "a.json"}])
    code, _, err = plan_json(cfg, f"{server.endpoint}/t/", cache, "--no-optimal")
    assert code == 8, err
    assert "writable by group or others" in error_line(err) and "SPOTSTART_CACHE_DIR" in err
    assert not list(cache.rglob("a.json"))
