"""Saves and loads on S3 with one fault injected at each request in turn (issue 18's must-show).

A :class:`~tessera.testing.fault_proxy.FaultProxy` sits between an :class:`S3Storage` and the
session's ``moto_server``. A trial runs a save (or a load) with one rule that fires at request
``i``: every request index of a clean run for 503, resets before and after the upstream applied
the request, and lost responses; every third index for 500 (and, for loads, every other index
for the faults never forwarded), which keeps the module near 30 s. Each trial is judged by
what is ON THE SERVER afterwards, read with a client that does not go through the proxy: a save
either returned its manifest and the prefix holds that committed checkpoint, which loads
bit-exact (and passes ``tessera.verify`` where the faulted request reached the server), or
it raised a :class:`StorageError` naming an ``s3://`` URL and the prefix holds nothing (no root
``zarr.json``, and its leftovers removed, R9.7). A load gives the saved tensors
bit-exact or a clear error, never other data. The counts of requests are measured, not assumed,
so the trials follow the request pattern of the storage as it changes.

Then the write path's branches one by one: the lost answer to the root's and the claim's
conditional PUT (read back, R9.3, R9.11), chunk PUTs settled by comparing bytes (R9.4, R9.5),
throttling retried with backoff, multipart uploads under faults.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import tessera
import torch
from tessera.errors import (
    CheckpointExistsError,
    ChecksumMismatchError,
    StorageError,
    TesseraError,
)
from tessera.testing.fault_proxy import (
    Action,
    Delay,
    FaultProxy,
    LoseResponse,
    ResetAfter,
    ResetBefore,
    Respond,
    Rule,
    Truncate,
)

from .s3_server import S3Server, s3_server  # noqa: F401 - the session fixture, used by name
from .test_s3_storage import _options

obstore = pytest.importorskip("obstore", reason="S3 storage needs obstore (the s3 extra)")

from tessera.storage.s3 import S3Storage  # noqa: E402 - after the skip above

SAVE_ACTIONS: dict[str, Action] = {
    "503": Respond(503),
    "500": Respond(500),
    "reset-before": ResetBefore(),
    "reset-after": ResetAfter(),
    "lost": LoseResponse(),
}
FULL = ("503", "reset-before", "reset-after", "lost")
"""Tried at every request index; the others at every third (the module stays near 30 s)."""
LOAD_ACTIONS: dict[str, Action] = {
    "503": Respond(503),
    "reset-before": ResetBefore(),
    "reset-after": ResetAfter(),
    "truncated": Truncate(5),
}
SAVE_OPTIONS = tessera.SaveOptions(chunk_bytes=256, threads=1)  # one thread: request i is the same each trial
SLOW_DOWN = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
ROOT_PUT = r"/t-[0-9a-f]+/zarr\.json$"
"""The root ``zarr.json`` of a prefix from ``S3Server.fresh_prefix`` (not an array's)."""
TRIAL_LIMIT_S = 15.0
"""No trial may take longer (timeouts everywhere: never a hang)."""


def _state() -> dict[str, object]:
    """Three tensors of two chunks each at 256-byte chunks, and a value: 13 requests a save."""
    generator = torch.Generator().manual_seed(1818)
    return {
        "w": torch.randn(16, 8, generator=generator),
        "b": torch.randn(200, generator=generator).to(torch.bfloat16),
        "i": torch.arange(100, dtype=torch.int32),
        "step": 7,
    }


STATE = _state()


@pytest.fixture(scope="module")
def proxy(s3_server: S3Server) -> Iterator[FaultProxy]:  # noqa: F811
    with FaultProxy(s3_server.endpoint, timeout=10.0) as running:
        yield running


def _through(proxy: FaultProxy, server: S3Server, prefix: str, multipart_bytes: int = 64 << 20) -> S3Storage:
    """The storage under test: through the proxy, short timeouts, two fast retries."""
    options = _options(server)
    options.endpoint_url = proxy.url
    options.timeout_s, options.connect_timeout_s = 2.0, 1.0
    options.max_retries, options.retry_timeout_s, options.backoff_s = 2, 5.0, 0.01
    options.multipart_bytes = multipart_bytes
    return S3Storage(server.bucket, prefix, options)


def _direct(server: S3Server, prefix: str) -> S3Storage:
    """The judge's view of the server: no proxy."""
    return S3Storage(server.bucket, prefix, _options(server))


def _same(loaded: dict[str, object], state: dict[str, object]) -> bool:
    for key, value in state.items():
        got = loaded.get(key)
        if isinstance(value, torch.Tensor):
            if not isinstance(got, torch.Tensor) or got.dtype != value.dtype or got.shape != value.shape:
                return False
            if not got.view(torch.uint8).equal(value.view(torch.uint8)):
                return False
        elif got != value:
            return False
    return loaded.keys() == state.keys()


def _save_trial(
    proxy: FaultProxy, server: S3Server, rules: list[Rule], verify: bool = True
) -> tuple[str, str | None]:
    """One save with ``rules``, judged on the server: ``("committed" | "refused", problem)``;
    with ``verify``, a committed checkpoint must pass ``tessera.verify`` too."""
    prefix = server.fresh_prefix()
    proxy.set_rules(rules)
    start = time.monotonic()
    manifest, error = None, None
    try:
        manifest = tessera.save(STATE, _through(proxy, server, prefix), options=SAVE_OPTIONS)
    except Exception as exc:  # noqa: BLE001 - judged below
        error = exc
    elapsed = time.monotonic() - start
    proxy.set_rules([])
    direct = _direct(server, prefix)
    if elapsed > TRIAL_LIMIT_S:
        return "slow", f"took {elapsed:.1f} s"
    if error is not None:
        if not isinstance(error, StorageError):  # CheckpointExistsError: never for a lone writer
            return "refused", f"raised {type(error).__name__}: {error}"
        if "s3://" not in str(error):
            return "refused", f"the error names no s3:// URL: {error}"
        if direct.size("zarr.json") is not None:
            return "refused", f"raised ({error}) but the root zarr.json is there"
        if direct.exists():
            return "refused", f"raised ({error}) and left {direct.list('')} (R9.7)"
        return "refused", None
    assert manifest is not None
    try:
        loaded = tessera.load(direct)
    except TesseraError as exc:
        return "committed", f"returned a manifest but the checkpoint does not load: {exc}"
    if tessera.open(direct).manifest.save_id != manifest.save_id:
        return "committed", "the committed manifest is not the one the save returned"
    if not _same(loaded, STATE):
        return "committed", "the committed checkpoint does not load bit-exact"
    report = tessera.verify(direct) if verify else None
    return "committed", None if report is None or report.ok else f"verify failed: {report}"


def _clean_requests(proxy: FaultProxy, run: Callable[[], object]) -> list[str]:
    proxy.set_rules([])
    run()
    return [f"{e.method} {e.path}" for e in proxy.exchanges]


@pytest.mark.parametrize("name", sorted(SAVE_ACTIONS))
def test_one_fault_at_each_request_of_a_save(proxy: FaultProxy, s3_server: S3Server, name: str) -> None:  # noqa: F811
    """Every request index of a save, one ``name`` fault: committed and bit-exact, or a clear
    StorageError with nothing left on the server. With two retries, every single fault heals."""
    clean = _clean_requests(
        proxy,
        lambda: tessera.save(
            STATE, _through(proxy, s3_server, s3_server.fresh_prefix()), options=SAVE_OPTIONS
        ),
    )
    assert 10 <= len(clean) <= 40, clean
    outcomes: Counter[str] = Counter()
    problems = []
    indices = range(len(clean)) if name in FULL else range(0, len(clean), 3)
    for index in indices:
        request = clean[index]
        # verify where the upstream applied the faulted request (the read-back cases); elsewhere
        # the bit-exact load is the judge (a tenth of a second a trial less)
        rules = [Rule(SAVE_ACTIONS[name], index=index)]
        outcome, problem = _save_trial(proxy, s3_server, rules, verify=name in ("lost", "reset-after"))
        outcomes[outcome] += 1
        if problem:
            problems.append(f"{name} at request {index} ({request}): {problem}")
    assert not problems, "\n".join(problems)
    assert outcomes == {"committed": len(indices)}, (outcomes, clean)


PERSISTENT = {
    "claim-503": (Respond(503), r"\.tessera-claim\.json$", "refused"),
    "chunk-reset-before": (ResetBefore(), r"/w/c/1/0$", "refused"),
    "array-doc-500": (Respond(500), r"/b/zarr\.json$", "refused"),
    "root-503": (Respond(503, SLOW_DOWN), ROOT_PUT, "refused"),
    "root-lost": (LoseResponse(), ROOT_PUT, "committed"),
}


@pytest.mark.parametrize("name", sorted(PERSISTENT))
def test_a_fault_at_every_attempt_of_one_put(proxy: FaultProxy, s3_server: S3Server, name: str) -> None:  # noqa: F811
    """The same fault at every attempt of one object's PUT: the retries run out, the save fails
    with a StorageError and removes what it wrote (R9.7); but where every attempt was applied
    and only the answers lost (the root), the read-back finds this save's root: committed."""
    action, path, expected = PERSISTENT[name]
    assert _save_trial(proxy, s3_server, [Rule(action, method="PUT", path=path)]) == (expected, None)


def test_a_timeout_on_the_root_put_is_read_back(proxy: FaultProxy, s3_server: S3Server) -> None:  # noqa: F811
    """A root PUT that answers after the client's timeout (and is applied then): committed."""
    outcome, problem = _save_trial(proxy, s3_server, [Rule(Delay(2.3), method="PUT", path=ROOT_PUT, nth=0)])
    assert (outcome, problem) == ("committed", None)


# -- the conditional PUTs of the claim and the root (R9.3, R9.11) ------------------------------


@pytest.mark.parametrize("action", [LoseResponse(), ResetAfter()], ids=["lost", "reset-after"])
def test_the_root_put_whose_answer_is_lost_is_read_back(
    proxy: FaultProxy,
    s3_server: S3Server,  # noqa: F811
    action: Action,
) -> None:
    """The root PUT is applied but its answer lost: the retry gets 412, the writer reads the root
    back, finds its own save_id, and reports the commit (R9.11)."""
    prefix = s3_server.fresh_prefix()
    proxy.set_rules([Rule(action, method="PUT", path=ROOT_PUT, nth=0)])
    manifest = tessera.save(STATE, _through(proxy, s3_server, prefix), options=SAVE_OPTIONS)
    root = [(e.method, e.status, e.upstream_status) for e in proxy.exchanges if re.search(ROOT_PUT, e.path)]
    lost = 500 if isinstance(action, LoseResponse) else None
    assert root == [("PUT", lost, 200), ("PUT", 412, 412), ("GET", 200, 200)]
    direct = _direct(s3_server, prefix)
    assert tessera.open(direct).manifest.save_id == manifest.save_id
    assert _same(tessera.load(direct), STATE)


def _put_directly(server: S3Server, key: str, data: bytes) -> None:  # noqa: F811
    obstore.put(_direct(server, "")._store, key, data)


def test_a_rival_root_behind_a_lost_answer_is_not_taken_for_ours(
    proxy: FaultProxy,
    s3_server: S3Server,  # noqa: F811
) -> None:
    """A rival's root is there; our PUT's 412 is lost (500), the retry gets 412: the read-back
    finds another save_id, so the publication fails with CheckpointExistsError (R9.11)."""
    prefix = s3_server.fresh_prefix()
    rival = b'{"attributes": {"tessera": {"save_id": "rival"}}}'
    _put_directly(s3_server, f"{prefix}/zarr.json", rival)
    storage = _through(proxy, s3_server, prefix)
    proxy.set_rules([Rule(LoseResponse(), method="PUT", nth=0)])
    with pytest.raises(CheckpointExistsError, match=re.escape(f"s3://{s3_server.bucket}/{prefix}/zarr.json")):
        storage.publish_root(b'{"attributes": {"tessera": {"save_id": "mine"}}}', "mine")
    assert [(e.method, e.status) for e in proxy.exchanges] == [("PUT", 500), ("PUT", 412), ("GET", 200)]
    assert _direct(s3_server, prefix).read_file("zarr.json", 1 << 10) == rival


def test_a_412_to_the_first_root_put_is_a_rival_without_read_back(
    proxy: FaultProxy,
    s3_server: S3Server,  # noqa: F811
) -> None:
    storage = _through(proxy, s3_server, s3_server.fresh_prefix())
    proxy.set_rules([Rule(Respond(412), method="PUT")])
    with pytest.raises(CheckpointExistsError, match="another writer committed first"):
        storage.publish_root(b"{}", "mine")
    assert [(e.method, e.status) for e in proxy.exchanges] == [("PUT", 412)]


def test_a_root_put_never_answered_and_not_there_is_a_clear_error(
    proxy: FaultProxy,
    s3_server: S3Server,  # noqa: F811
) -> None:
    """Every attempt refused (503): the read-back finds nothing, so nothing was committed."""
    prefix = s3_server.fresh_prefix()
    storage = _through(proxy, s3_server, prefix)
    proxy.set_rules([Rule(Respond(503, SLOW_DOWN), method="PUT")])
    with pytest.raises(StorageError, match=r"SlowDown.*not there; nothing was committed") as caught:
        storage.publish_root(b"{}", "mine")
    assert f"s3://{s3_server.bucket}/{prefix}/zarr.json" in str(caught.value)
    assert [e.method for e in proxy.exchanges] == ["PUT"] * 3 + ["GET"]


@pytest.mark.parametrize("rival", [False, True], ids=["own", "rival"])
def test_the_claim_whose_answer_is_lost_is_read_back(
    proxy: FaultProxy,
    s3_server: S3Server,  # noqa: F811
    rival: bool,
) -> None:
    """R9.3: lost answer then 412: our own save_id holds the claim (the save goes on to check
    conditional writes); another's is CheckpointExistsError, and the rival's claim stays."""
    prefix = s3_server.fresh_prefix()
    if rival:
        _put_directly(s3_server, f"{prefix}/.tessera-claim.json", b'{"save_id": "rival"}')
    storage = _through(proxy, s3_server, prefix)
    proxy.set_rules([Rule(LoseResponse(), method="PUT", nth=0)])
    mine = b'{"save_id": "mine"}'
    if rival:
        with pytest.raises(CheckpointExistsError, match="already claimed"):
            storage.claim(mine)
    else:
        storage.claim(mine)
    methods = [(e.method, e.status) for e in proxy.exchanges]
    assert methods[1:4] == [("PUT", 500), ("PUT", 412), ("GET", 200)]
    claim = _direct(s3_server, prefix).read_file(".tessera-claim.json", 1 << 10)
    assert claim == (b'{"save_id": "rival"}' if rival else mine)


def test_a_failed_check_of_conditional_writes_removes_the_claim(
    proxy: FaultProxy,
    s3_server: S3Server,  # noqa: F811
) -> None:
    """The claim is ours, but the second (checking) PUT never gets a clear answer: the save is
    refused with a StorageError and its claim removed (R9.7), so the prefix is free again."""
    prefix = s3_server.fresh_prefix()
    storage = _through(proxy, s3_server, prefix)
    proxy.set_rules([Rule(Respond(503), method="PUT", nth=n) for n in (1, 2, 3)])
    with pytest.raises(StorageError, match="did not answer clearly.*conditional writes"):
        storage.claim(b'{"save_id": "mine"}')
    assert not _direct(s3_server, prefix).exists()


def test_a_store_that_ignores_conditional_writes_is_refused_before_anything_is_written(
    proxy: FaultProxy,
    s3_server: S3Server,  # noqa: F811
) -> None:
    """A store that answers 200 to the second ``If-None-Match: *`` PUT of the claim (here the
    proxy answers for it) would let two saves share a prefix and a root replace another's: the
    save is refused by name, and nothing stays under the prefix (not even the claim)."""
    prefix = s3_server.fresh_prefix()
    accepted = Respond(200, b"", headers=(("ETag", '"0123456789abcdef"'),))
    proxy.set_rules([Rule(accepted, method="PUT", path=r"\.tessera-claim\.json", nth=1)])
    with pytest.raises(StorageError, match="ignores conditional writes"):
        tessera.save(_state(), _through(proxy, s3_server, prefix))
    assert [e.method for e in proxy.exchanges if e.method == "PUT"] == ["PUT", "PUT"]
    assert not _direct(s3_server, prefix).exists()


# -- chunk and array documents (R9.4, R9.5) ------------------------------------------------------


@pytest.mark.parametrize("action", [LoseResponse(), ResetAfter()], ids=["lost", "reset-after"])
def test_a_chunk_put_applied_unseen_is_settled_by_its_bytes(
    proxy: FaultProxy,
    s3_server: S3Server,  # noqa: F811
    action: Action,
) -> None:
    """Applied upstream, answer lost: the retry's 412 is settled by reading the object back;
    equal bytes are our own attempt (only the claim's holder writes there, R9.4)."""
    prefix = s3_server.fresh_prefix()
    storage = _through(proxy, s3_server, prefix)
    proxy.set_rules([Rule(action, method="PUT", nth=0)])
    storage.write_file("w/c/0", [b"abc", memoryview(b"def")])
    assert [(e.method, e.upstream_status) for e in proxy.exchanges] == [
        ("PUT", 200),
        ("PUT", 412),
        ("GET", 200),
    ]
    assert _direct(s3_server, prefix).read_file("w/c/0", 100) == b"abcdef"


def test_other_bytes_behind_an_unclear_answer_are_refused(
    proxy: FaultProxy,
    s3_server: S3Server,  # noqa: F811
) -> None:
    prefix = s3_server.fresh_prefix()
    _put_directly(s3_server, f"{prefix}/w/c/0", b"theirs")
    storage = _through(proxy, s3_server, prefix)
    proxy.set_rules([Rule(LoseResponse(), method="PUT", nth=0)])
    url = f"s3://{s3_server.bucket}/{prefix}/w/c/0"
    with pytest.raises(StorageError, match=re.escape(url) + ".*other bytes"):
        storage.write_file("w/c/0", [b"mine!!"])
    proxy.set_rules([])
    with pytest.raises(StorageError, match=re.escape(url) + ": it exists"):
        storage.write_file("w/c/0", [b"mine!!"])  # a 412 to the first attempt: no read-back
    assert [e.method for e in proxy.exchanges] == ["PUT"]
    assert _direct(s3_server, prefix).read_file("w/c/0", 100) == b"theirs"


def test_throttling_is_retried_with_backoff_and_bounded(
    proxy: FaultProxy,
    s3_server: S3Server,  # noqa: F811
) -> None:
    """Two 503 SlowDown answers, then success; always SlowDown: a StorageError naming the URL and
    the store's answer after exactly max_retries + 1 attempts (then a read-back: not there)."""
    prefix = s3_server.fresh_prefix()
    storage = _through(proxy, s3_server, prefix)
    proxy.set_rules([Rule(Respond(503, SLOW_DOWN), method="PUT", nth=n) for n in (0, 1)])
    storage.write_file("a", [b"x"])
    assert [e.status for e in proxy.exchanges] == [503, 503, 200]
    proxy.set_rules([Rule(Respond(503, SLOW_DOWN), method="PUT")])
    start = time.monotonic()
    with pytest.raises(StorageError, match=re.escape(f"s3://{s3_server.bucket}/{prefix}/b") + ".*SlowDown"):
        storage.write_file("b", [b"y"])
    assert [e.method for e in proxy.exchanges] == ["PUT", "PUT", "PUT", "GET"]
    assert time.monotonic() - start < 2.0
    assert _direct(s3_server, prefix).size("b") is None


def _boto3_client(server: S3Server) -> Any:
    """boto3's S3 client on the server, directly: it lists multipart uploads, which obstore cannot."""
    boto3 = pytest.importorskip("boto3")
    env = server.env()
    return boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        region_name=env["AWS_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )


@pytest.mark.parametrize("name", sorted(SAVE_ACTIONS))
def test_one_fault_at_each_request_of_a_multipart_upload(
    proxy: FaultProxy,
    s3_server: S3Server,  # noqa: F811
    name: str,
) -> None:
    """A file over ``multipart_bytes`` (create, one part, complete), one fault at each request:
    the object ends up whole, and every upload the client knew of was completed or aborted.
    The one upload left is one whose creation was applied but its answer lost: the client never
    learnt its id (obstore cannot list uploads); a bucket lifecycle rule (AbortIncompleteMultipartUpload)
    is what removes such leftovers."""
    client = _boto3_client(s3_server)
    data = bytes(range(256)) * (6 << 12)  # 6 MiB over a 1 MiB threshold
    prefix = s3_server.fresh_prefix()
    storage = _through(proxy, s3_server, prefix, multipart_bytes=1 << 20)
    clean = _clean_requests(proxy, lambda: storage.write_file("clean", [data]))
    assert [r.split()[0] for r in clean] == ["POST", "PUT", "POST"], clean
    problems = []
    for index in range(len(clean)):
        path = f"big-{index}"
        proxy.set_rules([Rule(SAVE_ACTIONS[name], index=index)])
        try:
            storage.write_file(path, [data])
        except StorageError as exc:
            problems.append(f"{name} at request {index}: {exc}")
        proxy.set_rules([])
        if _direct(s3_server, prefix).read_file(path, len(data)) != data:
            problems.append(f"{name} at request {index}: the object is not the data written")
        uploads = client.list_multipart_uploads(Bucket=s3_server.bucket, Prefix=f"{prefix}/{path}")
        left = len(uploads.get("Uploads", []))
        applied_unseen = index == 0 and name in ("lost", "reset-after")
        if left != int(applied_unseen):
            problems.append(f"{name} at request {index}: {left} uploads left")
    assert not problems, "\n".join(problems)


def test_a_multipart_upload_that_keeps_failing_leaves_nothing(
    proxy: FaultProxy,
    s3_server: S3Server,  # noqa: F811
) -> None:
    """Every part PUT refused: a StorageError naming the URL, no object, no upload left open
    (the client aborts the uploads it started)."""
    client = _boto3_client(s3_server)
    prefix = s3_server.fresh_prefix()
    storage = _through(proxy, s3_server, prefix, multipart_bytes=1 << 20)
    proxy.set_rules([Rule(Respond(503), method="PUT", path="partNumber=")])
    with pytest.raises(StorageError, match=re.escape(f"s3://{s3_server.bucket}/{prefix}/big")):
        storage.write_file("big", [bytes(2 << 20)])
    assert _direct(s3_server, prefix).size("big") is None
    assert not client.list_multipart_uploads(Bucket=s3_server.bucket, Prefix=prefix).get("Uploads")
    assert sum(e.method == "DELETE" for e in proxy.exchanges) == 3  # each of the 3 uploads aborted


# -- loads ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(s3_server: S3Server) -> str:  # noqa: F811
    prefix = s3_server.fresh_prefix()
    tessera.save(STATE, _direct(s3_server, prefix), options=SAVE_OPTIONS)
    return prefix


@pytest.mark.parametrize("name", sorted(LOAD_ACTIONS))
def test_one_fault_at_each_request_of_a_load(
    proxy: FaultProxy,
    s3_server: S3Server,  # noqa: F811
    saved: str,
    name: str,
) -> None:
    """Every request index of a load, one fault (the faults never forwarded, 503 and a reset
    before, at every other index): the tensors bit-exact, or a StorageError or
    ChecksumMismatchError naming the URL; a truncated body is never taken as data."""
    storage = _through(proxy, s3_server, saved)
    clean = _clean_requests(proxy, lambda: tessera.load(storage, threads=1))
    problems = []
    step = 1 if name in ("reset-after", "truncated") else 2  # the never-forwarded: every other index
    for index in range(0, len(clean), step):
        request = clean[index]
        proxy.set_rules([Rule(LOAD_ACTIONS[name], index=index)])
        start = time.monotonic()
        try:
            loaded = tessera.load(storage, threads=1)
            outcome = "bit-exact" if _same(loaded, STATE) else "WRONG DATA"
        except (StorageError, ChecksumMismatchError) as exc:
            outcome = "refused" if "s3://" in str(exc) else f"unnamed: {exc}"
        except Exception as exc:  # noqa: BLE001 - reported below
            outcome = f"{type(exc).__name__}: {exc}"
        if time.monotonic() - start > TRIAL_LIMIT_S:
            outcome = "slow"
        if outcome not in ("bit-exact", "refused"):
            problems.append(f"{name} at request {index} ({request}): {outcome}")
    proxy.set_rules([])
    assert not problems, "\n".join(problems)
