"""`spotstart k8s controller --record-trace` with a leader and a standby pointed at one
directory (the rendered controller Deployment with 2 replicas on a shared volume), over real
HTTP against kmock: only the leader holds the recording's lock; a standby never exits for it
(it did: exit 2 at start, a crash loop); a lost lease hands the lock back; a new leader whose
predecessor still holds the lock decides without recording and records once it is free."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spotstart.k8s.api import make_client
from spotstart.k8s.controller import Controller
from tests.k8s.apiserver import ApiServer
from tests.k8s.test_controller import (
    NAME,
    NS,
    PODS,
    ZONES,
    cluster,
    config,
    patch,
    pod,
    replicas,
    until,
)
from tests.k8s.test_controller_record import Wall

pytest.importorskip("kmock")
pytest.importorskip("lightkube")

pytestmark = [pytest.mark.kmock(cls=ApiServer), pytest.mark.timeout(120)]
LEASE = ("coordination.k8s.io/v1/leases", NS, f"{NAME}-controller")


@contextlib.contextmanager
def held(record: Path) -> Iterator[bool]:
    """Try the recording's lock as a third process would; True when it was free (then held
    until the block ends)."""
    fd = os.open(record / ".record.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            assert exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
            yield False
            return
        yield True
    finally:
        os.close(fd)


def holder(api: Any) -> str | None:
    try:
        return api.objects[LEASE]["spec"].get("holderIdentity")  # type: ignore[no-any-return]
    except KeyError:
        return None


def lock_free(record: Path) -> bool:
    with held(record) as free:
        return free


def recording(record: Path, identity: str, wall: Any, **kw: Any) -> Controller:
    cfg = config(
        identity=identity,
        record_dir=str(record),
        record_gap_s=60,
        record_assumed_nodes=1,
        record_flush_s=0,
        **kw,
    )
    return Controller(cfg, make_client("http://unused"), wall=wall)


class Run:
    def __init__(self, api: Any, c: Controller) -> None:
        c.client = make_client(str(api.url))
        c.elector.client = c.informer.client = c.client
        self.c = c
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(c.run(self.stop))

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 10)
        await self.c.client.close()


async def reconciled(c: Controller) -> None:
    before = c.reconciles
    c.informer.changed.set()
    await until(lambda: c.reconciles > before)


async def test_a_standby_waits_and_the_next_leader_resumes_the_recording(
    kmock: Any, tmp_path: Path
) -> None:
    record = tmp_path / "rec"
    wall = Wall()
    await cluster(kmock, pod("llm-spot-1", zone="zone-a"), pod("llm-spot-2", zone="zone-b"))
    first = Run(kmock, recording(record, "controller-1", wall))
    await until(lambda: first.c.recording is not None)
    # the standby starts while the leader holds the lock: before the fix, RecordError (exit 2)
    second = Run(kmock, recording(record, "controller-2", wall))
    try:
        wall.at(5)
        await reconciled(first.c)
        wall.at(70)
        await reconciled(first.c)  # tick 0 closed and written
        await asyncio.sleep(1.0)  # several lease retry periods
        assert not second.task.done()
        assert first.c.elector.is_leader and not second.c.elector.is_leader
        assert second.c.recording is None and second.c.reconciles == 0
        assert not lock_free(record)  # the leader's
        assert (record / "zone-a.json").exists()
        # the leader goes (its lease handed back, its ticks written): the standby leads, takes
        # the lock and goes on from the leader's ticks
        wall.at(130)
        await first.close()
        assert first.c.recording is None
        await until(lambda: second.c.recording is not None, timeout_s=10)
        assert second.c.recording is not None and second.c.recording.recorder.ticks == 2
        assert kmock.objects[LEASE]["spec"]["holderIdentity"] == "controller-2"
        assert not lock_free(record)
        await patch(
            kmock,
            f"{PODS}/llm-spot-2",
            {"metadata": {"annotations": {"spotstart.dev/notice": "preemption"}}},
        )
        await until(lambda: replicas(kmock, "ondemand") == 1)
    finally:
        if not first.task.done():
            await first.close()
        await second.close()
    assert lock_free(record)


async def test_a_lost_lease_hands_the_lock_back(kmock: Any, tmp_path: Path) -> None:
    record = tmp_path / "rec"
    wall = Wall()
    await cluster(kmock, pod("llm-spot-1", zone="zone-a"))
    run = Run(kmock, recording(record, "controller-1", wall))
    try:
        await until(lambda: run.c.recording is not None)
        wall.at(70)
        await reconciled(run.c)
        # another candidate holds the lease now (renewing it): we stop leading, and recording
        intruder = {"holderIdentity": "intruder", "leaseDurationSeconds": 3600}
        await patch(kmock, f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/{LEASE[2]}",
                    {"spec": intruder})  # fmt: skip
        await until(lambda: not run.c.elector.is_leader, timeout_s=10)
        await until(lambda: run.c.recording is None)
        assert lock_free(record)
        assert not run.task.done()
        # the intruder hands it back; we lead and record again, from the ticks we wrote
        await patch(kmock, f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/{LEASE[2]}",
                    {"spec": {"holderIdentity": None, "leaseDurationSeconds": 1}})  # fmt: skip
        await until(lambda: run.c.recording is not None, timeout_s=10)
        assert run.c.recording is not None and run.c.recording.recorder.ticks == 1
    finally:
        await run.close()


async def test_a_leader_whose_predecessor_holds_the_lock_decides_then_records(
    kmock: Any, tmp_path: Path
) -> None:
    record = tmp_path / "rec"
    record.mkdir()
    wall = Wall()
    await cluster(kmock, pod("llm-spot-1", zone="zone-a"), pod("llm-spot-2", zone="zone-b"))
    with held(record) as free:  # the old leader, its lease lost, still writing
        assert free
        run = Run(kmock, recording(record, "controller-1", wall, target=3))
        try:
            await until(lambda: run.c.elector.is_leader)
            # it scales (target 3 over 2 ready spot pods) without its recording
            await until(lambda: replicas(kmock, "ondemand") == 1)
            assert run.c.recording is None and not run.task.done()
        except BaseException:
            await run.close()
            raise
    try:
        await asyncio.sleep(run.c.cfg.lease.retry_period_s)
        await reconciled(run.c)  # a reconcile after the lock is free takes it
        assert run.c.recording is not None
        assert not lock_free(record)
    finally:
        await run.close()
    assert lock_free(record)


async def cli(api: Any, record: Path, identity: str, log: int) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "spotstart", "k8s", "controller",
        "--name", NAME, "--namespace", NS, "--zones", ",".join(ZONES),
        "--target", "2", "--kube-api", str(api.url), "--identity", identity,
        "--lease-duration-s", "3", "--renew-deadline-s", "2", "--retry-period-s", "0.5",
        "--record-trace", str(record), "--record-gap", "1",
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, stderr=log,
    )  # fmt: skip


async def test_two_cli_processes_share_one_directory(kmock: Any, tmp_path: Path) -> None:
    """The CLI as processes, as the rendered Deployment with 2 replicas runs it."""
    record = tmp_path / "rec"
    await cluster(kmock, pod("llm-spot-1", zone="zone-a"), pod("llm-spot-2", zone="zone-b"))
    procs: list[asyncio.subprocess.Process] = []
    logs = [os.open(tmp_path / f"cli-{n}.log", os.O_WRONLY | os.O_CREAT, 0o644) for n in (1, 2)]
    for n in (1, 2):
        procs.append(await cli(kmock, record, f"cli-{n}", logs[n - 1]))
        if n == 1:
            await until(lambda: holder(kmock) == "cli-1", timeout_s=30)
    try:
        await asyncio.sleep(3.0)
        assert [p.returncode for p in procs] == [None, None]  # the standby did not exit
        assert not lock_free(record)
        procs[0].send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(procs[0].wait(), 15) == 0
        await until(lambda: holder(kmock) == "cli-2", timeout_s=30)
        await until(lambda: b"recording (leader)" in (tmp_path / "cli-2.log").read_bytes())
        assert not lock_free(record)  # cli-2's now
        procs[1].send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(procs[1].wait(), 15) == 0
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
        for fd in logs:
            os.close(fd)
    assert lock_free(record)
    err = b"".join((tmp_path / f"cli-{n}.log").read_bytes() for n in (1, 2))
    assert b"Traceback" not in err
    assert (record / "fleet.yaml").exists()
