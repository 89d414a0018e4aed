"""Run directories on S3 (spec §10, R10.12 "Object store"): RunDirectory and Checkpointer on a
real ``moto_server``, locks as leases, restart safety after SIGKILL.

- a run on ``s3://``: steps save, ``latest`` moves forward (one PUT), listing, retention deletes
  root ``zarr.json`` first (checked on the server, and with the deletion cut short after it);
- leases: a live lease refuses a second taker, an expired one is taken over (``created`` false),
  a released-and-kept marker is free, a lost lease warns, a lapsed lease commits nothing;
- a saver process killed mid-save leaves its chunks and its lease; while the lease lives the
  step is refused ``already_exists``; once it expires a restarted save removes the leftover and
  commits (R10.11);
- two concurrent savers of one step: exactly one commits;
- ``tessera.Checkpointer("s3://...")``: asynchronous saves, keep_last, load in place.

Leases here last 1.5 s (``lease_ttl_s``), so expiry is quick.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from datetime import datetime
from typing import Any

import pytest
import tessera
import torch
from tessera.errors import CheckpointExistsError, StorageError, TesseraWarning

from .conftest import assert_tree_bit_equal
from .s3_server import S3Server, s3_server  # noqa: F401 - the session fixture, used by name
from .test_s3_storage import _options

obstore = pytest.importorskip("obstore", reason="S3 storage needs obstore (the s3 extra)")

from tessera.storage.s3 import RUN_LOCK, S3Options, S3Storage  # noqa: E402 - after the skip above
from tessera.testing.fault_proxy import FaultProxy, ResetAfter, Respond, Rule  # noqa: E402

TTL = 1.5
"""The lease of the tests of expiry (a long pause of a loaded machine must not outlast it)."""
KILL_TTL = 3.0
"""The killed saver's lease: long enough that the restart is refused while it lives."""
SKEW = 0.2
LONG_TTL = 30.0
"""The other tests' leases: a save never outlasts them, however loaded the machine."""


def _lease_options(server: S3Server, endpoint: str | None = None, ttl: float = LONG_TTL) -> S3Options:
    base = _options(server)
    return S3Options(
        endpoint_url=endpoint or base.endpoint_url,
        config=base.config,
        timeout_s=5.0,
        max_retries=1,
        retry_timeout_s=5.0,
        lease_ttl_s=ttl,
        lease_skew_s=SKEW,
    )


def _run_root(
    server: S3Server, prefix: str | None = None, endpoint: str | None = None, ttl: float = LONG_TTL
) -> S3Storage:
    prefix = prefix or f"{server.fresh_prefix()}/run"
    return S3Storage(server.bucket, prefix, _lease_options(server, endpoint, ttl))


def _keys(server: S3Server, prefix: str) -> list[str]:
    """Every object under ``prefix/`` on the server, relative to it."""
    store = S3Storage(server.bucket, prefix, _options(server))._store
    return sorted(
        m["path"][len(prefix) + 1 :] for batch in obstore.list(store, prefix=f"{prefix}/") for m in batch
    )


def _state(step: int, n: int = 64) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(step)
    return {"w": torch.rand(n, 16, generator=generator), "step": step}


def test_run_directory_on_s3(s3_server: S3Server) -> None:  # noqa: F811
    root = _run_root(s3_server)
    prefix = root.location.removeprefix(f"s3://{s3_server.bucket}/")
    run = tessera.RunDirectory(root, keep_last=2)
    for step in (1, 2, 3):
        run.save(_state(step), step=step)
        assert root.read_file("latest", 100) == f"step-{step:08d}\n".encode()
    assert [(c.step, c.committed, c.latest) for c in run.checkpoints()] == [(2, True, False), (3, True, True)]
    assert not any(k.startswith("step-00000001/") for k in _keys(s3_server, prefix))  # retention ran
    assert not any(k.endswith(".lock") for k in _keys(s3_server, prefix)), "a lock was left behind"
    latest = run.latest()
    assert isinstance(latest, S3Storage)
    assert_tree_bit_equal(tessera.load(latest), _state(3))
    # ``latest`` only moves forward: a lower step saved later leaves it where it is (R10.8).
    tessera.RunDirectory(root).save(_state(0), step=0)
    assert root.read_file("latest", 100) == b"step-00000003\n"

    # A deletion is root-first: cut short after its first request (obstore deletes by POST
    # ?delete, one key or a batch), step 2 is left uncommitted with its chunks (R10.6).
    with FaultProxy(s3_server.endpoint.removeprefix("http://"), []) as proxy:
        proxied = _run_root(s3_server, prefix, proxy.url)
        proxy.set_rules([Rule(Respond(500), method="POST", path=r"\?delete", nth=n) for n in range(1, 5)])
        with pytest.raises(StorageError, match="cannot remove the checkpoint .*step-00000002"):
            proxied.remove_checkpoint("step-00000002")
    step2 = [k for k in _keys(s3_server, prefix) if k.startswith("step-00000002/")]
    assert len(step2) > 2 and "step-00000002/zarr.json" not in step2
    assert [(c.step, c.committed) for c in run.checkpoints()] == [(0, True), (2, False), (3, True)]
    run.discard(2)  # no lock marker: retention leaves it (R10.10), discard removes it
    assert tessera.RunDirectory(root, keep_last=1).apply_retention() == ["step-00000000"]
    assert {k.split("/")[0] for k in _keys(s3_server, prefix)} == {"latest", "step-00000003"}


def _marker(root: S3Storage, name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(root.read_file(name, 4096))
    return doc


def _expires(root: S3Storage, name: str) -> float:
    """The expiry of the lease at ``name``, UNIX seconds (it is written as RFC 3339 UTC)."""
    text = _marker(root, name)["expires"]
    assert text.endswith("Z")
    return datetime.fromisoformat(text).timestamp()


def test_leases(s3_server: S3Server) -> None:  # noqa: F811
    root = _run_root(s3_server, ttl=TTL)
    other = S3Storage(s3_server.bucket, root.location.split("/", 3)[3], _lease_options(s3_server, ttl=TTL))
    first = root.lock(".s.lock", create=True, wait=0.0)
    assert first is not None and first.created
    expires = _expires(root, ".s.lock")
    time.sleep(TTL)  # the heartbeat renews it: still held after its first lease ran out
    assert _expires(root, ".s.lock") > expires
    assert other.lock(".s.lock", create=True, wait=0.0) is None
    first.release(keep_marker=True)
    assert _marker(root, ".s.lock")["expires"] == "1970-01-01T00:00:00.000Z"  # kept, free
    again = other.lock(".s.lock", create=False, wait=0.0)
    assert again is not None and not again.created
    # A holder that stops renewing (a killed process; here: its heartbeat stopped) loses the
    # lock once its lease expired and the skew margin passed; its late renewal is refused.
    again._stop.set()
    assert root.lock(".s.lock", create=False, wait=TTL / 2) is None
    taker = root.lock(".s.lock", create=False, wait=TTL + 2 * SKEW + 1)
    assert taker is not None and not taker.created
    with pytest.warns(TesseraWarning, match="lost the lock"):
        assert again.renew() is False
    again.release()  # lost: the taker's marker stays
    assert _expires(root, ".s.lock") > time.time()
    taker.release()
    assert root.kind(".s.lock") is None
    # The run's own lock is a marker that leaves nothing behind.
    whole = root.lock(None, create=False, wait=0.0)
    assert whole is not None and root.kind(RUN_LOCK) == "file"
    assert other.lock(None, create=False, wait=0.1) is None
    whole.release()
    assert root.entries() == []


def test_lost_answers_are_read_back(s3_server: S3Server) -> None:  # noqa: F811
    """A conditional PUT of a lease whose answer is lost after the server applied it (a reset)
    is settled by reading the marker back: the take, a renewal and the keeping release succeed."""
    prefix = f"{s3_server.fresh_prefix()}/run"
    with FaultProxy(s3_server.endpoint.removeprefix("http://"), []) as proxy:
        root = _run_root(s3_server, prefix, proxy.url, ttl=TTL)
        marker = r"/\.s\.lock$"
        proxy.set_rules([Rule(ResetAfter(), method="PUT", path=marker, nth=n) for n in range(3)])
        lease = root.lock(".s.lock", create=True, wait=0.0)
        assert lease is not None and lease.created
        lease._stop.set()  # renewals by hand only, so that the exchanges are these
        assert lease.renew() and lease.valid
        lease.release(keep_marker=True)
        assert [e.status for e in proxy.exchanges if e.method == "PUT"] == [None, None, None]
        # A 503 that the server did not apply: read back (unchanged), tried again.
        proxy.set_rules([Rule(Respond(503), method="PUT", path=marker, nth=1)])
        lease = root.lock(".s.lock", create=False, wait=0.0)
        assert lease is not None and not lease.created
        lease._stop.set()
        assert lease.renew() and lease.valid and lease._next_beat == TTL / 3
        assert [e.status for e in proxy.exchanges if e.method == "PUT"] == [200, 503, 200]
        # A renewal that stays unclear keeps the lock while its lease lasts, and retries sooner.
        proxy.set_rules([Rule(Respond(503), method="PUT", path=marker)])
        assert lease.renew() and lease.valid and lease._next_beat == TTL / 30
        proxy.set_rules([])
        lease.release(keep_marker=True)
    assert _marker(_run_root(s3_server, prefix), ".s.lock")["expires"] == "1970-01-01T00:00:00.000Z"


def test_a_lapsed_lease_commits_nothing(s3_server: S3Server) -> None:  # noqa: F811
    """A holder that could not renew its step lock in time (a stalled process; here its heartbeat is
    stopped) must not commit: another process may have taken the step over (R10.12)."""
    root = _run_root(s3_server, ttl=TTL)
    lease = root.lock(".step-00000001.lock", create=True, wait=0.0)
    assert lease is not None
    step = root.child("step-00000001")
    lease._stop.set()
    time.sleep(TTL - SKEW)
    assert not lease.valid
    with pytest.raises(StorageError, match="not renewed in time.*nothing was committed"):
        tessera.save(_state(1), step)
    assert step.entries() == []  # the failed save removed what it wrote (R9.7)
    lease.release()
    assert _marker(root, ".step-00000001.lock")["expires"] == "1970-01-01T00:00:00.000Z"
    tessera.save(_state(1), step)  # released: a plain save of that prefix is no one's concern
    assert_tree_bit_equal(tessera.load(step), _state(1))


_SAVER = textwrap.dedent(
    """
    import sys
    import tessera
    from tessera.storage.s3 import S3Options, S3Storage
    from tests.test_s3_run_dir import _state

    bucket, prefix, endpoint = sys.argv[1:4]
    ttl, skew = float(sys.argv[4]), float(sys.argv[5])
    options = S3Options(
        endpoint_url=endpoint,
        config={"access_key_id": "testing", "secret_access_key": "testing"},
        lease_ttl_s=ttl,
        lease_skew_s=skew,
    )
    run = tessera.RunDirectory(S3Storage(bucket, prefix, options))
    run.save(_state(7, 4096), step=7, options=tessera.SaveOptions(chunk_bytes=1024, threads=1))
    """
)


def test_killed_saver_then_restart(s3_server: S3Server) -> None:  # noqa: F811
    root = _run_root(s3_server, ttl=KILL_TTL)
    prefix = root.location.removeprefix(f"s3://{s3_server.bucket}/")
    run = tessera.RunDirectory(root)
    run.save(_state(6), step=6)
    # A real process saving step 7 (256 chunks) is killed once some of its chunks are on the server.
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _SAVER,
            s3_server.bucket,
            prefix,
            s3_server.endpoint,
            str(KILL_TTL),
            str(SKEW),
        ],
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while sum(k.startswith("step-00000007/") for k in _keys(s3_server, prefix)) < 8:
            assert child.poll() is None, child.stderr.read().decode() if child.stderr else ""
            assert time.monotonic() < deadline, "the saver wrote nothing in 20 s"
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    killed_at = time.time()
    left = _keys(s3_server, prefix)
    assert ".step-00000007.lock" in left and "step-00000007/zarr.json" not in left
    # While its lease lives, the step is refused and nothing of the leftover is touched.
    assert _expires(root, ".step-00000007.lock") > time.time()
    with pytest.raises(CheckpointExistsError, match="being saved or deleted by another process"):
        run.save(_state(7), step=7)
    assert _keys(s3_server, prefix) == left
    # Once it expired, a restarted save removes the leftover and commits (R10.11).
    time.sleep(max(0.0, _expires(root, ".step-00000007.lock") + SKEW - time.time()) + 0.05)
    assert time.time() - killed_at < KILL_TTL + SKEW + 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run.save(_state(7), step=7)
    # Exactly what a save of that state into an empty run writes: nothing of the leftover stays.
    fresh = _run_root(s3_server)
    tessera.RunDirectory(fresh).save(_state(7), step=7)
    now = _keys(s3_server, prefix)
    fresh_prefix = fresh.location.removeprefix(f"s3://{s3_server.bucket}/")
    assert [k for k in now if k.startswith("step-00000007/")] == [
        k for k in _keys(s3_server, fresh_prefix) if k.startswith("step-00000007/")
    ]
    assert root.read_file("latest", 100) == b"step-00000007\n"
    assert_tree_bit_equal(tessera.load(run.latest()), _state(7))
    assert not any(k.endswith(".lock") for k in now)


def test_concurrent_savers_of_one_step(s3_server: S3Server) -> None:  # noqa: F811
    prefix = f"{s3_server.fresh_prefix()}/run"
    barrier = threading.Barrier(4)
    outcomes: list[str] = []

    def saver(value: float) -> None:
        run = tessera.RunDirectory(_run_root(s3_server, prefix))
        barrier.wait()
        try:
            run.save({"w": torch.full((256,), value)}, step=5, options=tessera.SaveOptions(chunk_bytes=128))
            outcomes.append(f"saved {value}")
        except CheckpointExistsError:
            outcomes.append("refused")

    threads = [threading.Thread(target=saver, args=(float(i),)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(outcomes)[:3] == ["refused"] * 3 and outcomes.count("refused") == 3, outcomes
    winner = float(next(o for o in outcomes if o.startswith("saved")).split()[1])
    latest = tessera.RunDirectory(_run_root(s3_server, prefix)).latest()
    assert latest is not None
    assert torch.equal(tessera.load(latest)["w"], torch.full((256,), winner))


def test_checkpointer_on_s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    url = f"s3://{s3_server.bucket}/{s3_server.fresh_prefix()}/run"
    model = torch.nn.Linear(8, 4)
    state: dict[str, Any] = {"model": model, "data": {"position": 0}}
    with tessera.Checkpointer(url, keep_last=2, async_save=True) as ckpt:
        for step in (10, 20, 30):
            with torch.no_grad():
                model.weight.fill_(float(step))
            state["data"] = {"position": step}
            ckpt.save(step, state)
    assert [c.step for c in tessera.RunDirectory(url).checkpoints()] == [20, 30]
    fresh = torch.nn.Linear(8, 4)
    loaded: dict[str, Any] = {"model": fresh, "data": {"position": 0}}
    with tessera.Checkpointer(url) as ckpt:
        assert ckpt.load(loaded).step == 30
    assert torch.equal(fresh.weight, torch.full((4, 8), 30.0)) and torch.equal(fresh.bias, model.bias)
    assert loaded["data"] == {"position": 30}
