"""``tessera.save``: plan, then claim, then write, then commit, from one rank or many (spec §9, §16).

Every rank describes what it holds (a local plan, metadata only); the
coordinator (rank 0) checks the ranks' shards against each other, assigns
every chunk one writer, builds the root document, and claims the path, all
before a byte of data is written. Each rank then moves the pieces of shared
chunks to their owners, writes its chunks and makes them durable; only when
every rank reports success does the coordinator publish the root. A bad key
or a bad sharding fails on every rank before the path is claimed; a rank that
fails or dies later leaves an uncommitted checkpoint that readers refuse.
One process is the same code with a world of one.
"""

from __future__ import annotations

import datetime as dt
import uuid
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, Unpack

import torch.distributed as dist

from ..distributed.collective import collective_for
from ..distributed.piece_exchange import exchange_pieces
from ..engine.chunk_writer import write_chunks
from ..engine.gpu.direct_io import storage_with_device_io
from ..errors import (
    CollectiveError,
    InvalidKeyError,
    SchemaViolationError,
    TesseraError,
    TesseraWarning,
)
from ..format.keys import Key
from ..format.manifest import FORMAT_NAME, Manifest, WriterInfo
from ..format.root import check_root_document
from ..format.strict_json import dumps
from ..planning.cache import PlanCache
from ..planning.chunk_crcs import chunk_lists, only_hex_digits_differ, with_chunk_lists
from ..planning.contents import manifest_contents
from ..planning.global_plan import GlobalPlan, RankPlan, make_global_plan
from ..planning.local_plan import LeafSpec, LocalPlan, make_local_plan
from ..planning.options import SaveOptions
from ..state.flatten import check_state_dict, flatten, is_json
from ..storage.base import Storage
from ..storage.resolve import Location
from ..version import __version__
from .save_arguments import DeprecatedSaveKeywords, save_options

__all__ = ["WRITER", "claim_document", "save"]

WRITER = WriterInfo("tessera-python", __version__)
T = TypeVar("T")


def save(
    state_dict: Mapping[Any, Any],
    location: Location,
    *,
    options: SaveOptions | None = None,
    metadata: Mapping[str, Any] | None = None,
    process_group: dist.ProcessGroup | None = None,
    plan_cache: PlanCache | None = None,
    parallelism: Mapping[str, Any] | None = None,
    progress: bool = False,
    **deprecated: Unpack[DeprecatedSaveKeywords],
) -> Manifest:
    """Save a nested state dict as a committed checkpoint at ``location``; the committed manifest.

    ``location`` is a new or empty directory (a path or a ``file://`` URL), a URL of a
    registered scheme, or a :class:`~tessera.storage.base.Storage` object: GPU-direct I/O is a
    storage with device I/O (:func:`~tessera.engine.gpu.direct_io.gpu_direct_storage`), whose
    chunks of GPU tensors go from device memory to their files through cuFile, checksummed on
    the GPU (the files are the same). ``options`` (:class:`~tessera.SaveOptions`) says how the
    state is stored: chunk size and shapes, compression, the keys that may be pickled, threads.

    Under ``torch.distributed`` every rank of ``process_group`` (default: the world) calls
    ``save`` with the same location and its own state dict, in which ``ShardedTensor``,
    ``ShardedObject`` and ``DTensor`` values say what part of each global tensor the rank holds;
    plain values are replicas and are written once. ``metadata`` (any JSON object) and
    ``parallelism`` (the layout, e.g. ``{"tp": 2, "dp": 2}``, provenance only) are taken from
    rank 0. ``plan_cache`` reuses the global plan of an earlier save with the same layout;
    ``progress`` shows a progress bar on rank 0's terminal. Returns the committed manifest on
    every rank. Raises :class:`~tessera.CheckpointExistsError` if the location was already
    claimed, :class:`~tessera.ShardingError` if the ranks' shards do not tile their tensors.

    To save in the background, see :func:`~tessera.save_async`. The keywords ``compression``,
    ``zstd_level``, ``chunk_bytes``, ``chunk_shapes``, ``threads``, ``pickle_keys`` and
    ``gpu_direct`` are deprecated aliases of ``options`` and of the storage (CHANGELOG.md).
    """
    check_state_dict(state_dict)
    options, gpu_direct = save_options(options, deprecated, "save")
    collective = collective_for(process_group)
    storage, error = _attempt(lambda: storage_with_device_io(location, gpu_direct))
    local = None
    if error is None:
        local, error = _attempt(lambda: _local_plan(state_dict, options, metadata, parallelism))
    digest = local.layout_digest(options, collective.world_size) if local else None
    reusable = plan_cache is not None and digest is not None and plan_cache.holds(digest)
    reports = collective.gather(_Report.of(error, digest, local, not reusable), "gathering the local plans")
    resend = collective.broadcast(_must_resend(reports, plan_cache), "agreeing on the plan cache")
    if resend:
        reports = collective.gather(_Report.of(error, digest, local, True), "gathering the local plans")
    instructions = None
    pending: _Pending | None = None
    if reports is not None:  # the coordinator
        instructions, pending = _coordinate(
            reports, options, storage, metadata, parallelism, plan_cache, collective.world_size
        )
    instruction: _Instruction = collective.scatter(instructions, "handing out the global plan")
    if instruction.error is not None:
        raise instruction.error
    if local is None or storage is None:
        raise CollectiveError("the coordinator went on with a save that failed on this rank")
    rank_plan = _rank_plan(instruction, digest, plan_cache)
    show = progress and collective.rank == 0
    crcs, error = _attempt(
        lambda: write_chunks(
            rank_plan, exchange_pieces(rank_plan, local, collective), storage, options.threads, show
        )
    )
    statuses = collective.gather((error, crcs), "reporting durable data and chunk CRCs")
    outcome: _Outcome | None = None
    if statuses is not None and pending is not None:  # the coordinator, which claimed the location
        outcome = _commit(statuses, storage, pending)
    outcome = collective.broadcast(outcome, "announcing the commit")
    if error is not None:
        raise error
    if outcome.error is not None:
        raise outcome.error
    if outcome.manifest is None:
        raise CollectiveError("the coordinator announced a commit without its manifest")
    return outcome.manifest


def _rank_plan(instruction: _Instruction, digest: bytes | None, cache: PlanCache | None) -> RankPlan:
    """This rank's plan: the coordinator's (kept in the cache for the next save), or the cached
    one where the coordinator found every rank's layout unchanged."""
    if instruction.rank_plan is not None:
        if cache is not None and digest is not None:
            cache.digest, cache.rank_plan = digest, instruction.rank_plan
        return instruction.rank_plan
    if cache is None or cache.rank_plan is None:
        raise CollectiveError("the coordinator reused a cached plan that this rank does not hold")
    cache.hits += 1
    return cache.rank_plan


@dataclass(frozen=True, slots=True)
class _Report:
    """What a rank sends the coordinator: metadata only (never the tensors of its pieces)."""

    error: TesseraError | None
    digest: bytes | None
    arrays: tuple[LeafSpec, ...] | None
    """``None`` when the rank's cached plan still fits its layout."""
    values: tuple[LeafSpec, ...] = ()
    order: tuple[str, ...] = ()
    lists: tuple[Key, ...] = ()
    tuples: tuple[Key, ...] = ()
    unused_pickle_keys: frozenset[str] = frozenset()

    @classmethod
    def of(
        cls, error: TesseraError | None, digest: bytes | None, local: LocalPlan | None, with_arrays: bool
    ) -> _Report:
        if local is None:
            return cls(error, None, None)
        arrays = local.arrays if with_arrays else None
        lists, tuples = local.lists, local.tuples
        return cls(error, digest, arrays, local.values, local.order, lists, tuples, local.unused_pickle_keys)


@dataclass(frozen=True, slots=True)
class _Instruction:
    error: TesseraError | None
    rank_plan: RankPlan | None
    """``None``: use the plan cache's."""


@dataclass(frozen=True, slots=True)
class _Pending:
    """What the coordinator keeps, never sends, between the claim and the commit."""

    manifest: Manifest
    """The manifest to commit, but for its chunk lists (R3.19), which the ranks' CRCs give."""
    ranks: tuple[RankPlan, ...]
    """Every rank's plan: which chunks the CRCs each rank reports belong to."""
    checked_root: bytes
    """The root document checked before the claim (zeros for the chunk lists)."""


@dataclass(frozen=True, slots=True)
class _Outcome:
    error: TesseraError | None
    manifest: Manifest | None


def _attempt(step: Callable[[], T]) -> tuple[T | None, TesseraError | None]:
    """Run a step whose failure every rank must learn of, instead of leaving peers waiting."""
    try:
        return step(), None
    except TesseraError as exc:
        return None, exc
    except Exception as exc:
        return None, CollectiveError(f"{type(exc).__name__}: {exc}")


def _local_plan(
    state_dict: Mapping[Any, Any],
    options: SaveOptions,
    metadata: Mapping[str, Any] | None,
    parallelism: Mapping[str, Any] | None,
) -> LocalPlan:
    for name, value in (("metadata", metadata), ("parallelism", parallelism)):
        if value is not None and not (isinstance(value, Mapping) and is_json(dict(value))):
            raise SchemaViolationError(f"{name} must be a JSON object (str keys, finite numbers)")
    return make_local_plan(flatten(state_dict), options)


def _must_resend(reports: list[_Report] | None, cache: PlanCache | None) -> bool:
    """Coordinator: some rank sent only its digest, but the cached plan cannot be reused."""
    if reports is None:
        return False
    if all(r.arrays is not None for r in reports):
        return False
    return _reusable(reports, cache) is None


def _reusable(reports: list[_Report], cache: PlanCache | None) -> GlobalPlan | None:
    """The cached global plan, if every rank's layout is the one it was made for."""
    if (
        cache is not None
        and all(r.arrays is None for r in reports)
        and tuple(r.digest for r in reports) == cache.all_digests
    ):
        return cache.plan
    return None


def _coordinate(
    reports: list[_Report],
    options: SaveOptions,
    storage: Storage | None,
    metadata: Mapping[str, Any] | None,
    parallelism: Mapping[str, Any] | None,
    cache: PlanCache | None,
    world_size: int,
) -> tuple[list[_Instruction], _Pending | None]:
    """Rank 0: the global plan, the manifest and the claim; or the error every rank raises."""
    errors = [r.error for r in reports if r.error is not None]
    try:
        if errors or storage is None:
            raise errors[0]
        plan, rank_plans = _global_plan(reports, options, cache)
        unused = frozenset.intersection(*(r.unused_pickle_keys for r in reports))
        if unused:
            raise InvalidKeyError(f"pickle_keys names keys the state dict lacks: {sorted(unused)}")
        entries, lists, tuples = manifest_contents(
            plan,
            [r.values for r in reports],
            [r.order for r in reports],
            [r.lists for r in reports],
            [r.tuples for r in reports],
        )
        manifest = Manifest(
            save_id=str(uuid.uuid4()),
            created=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            writer=WRITER,
            entries=entries,
            lists=lists,
            tuples=tuples,
            metadata=dict(metadata or {}),
            world_size=world_size,
            parallelism=dict(parallelism or {}),
        )
        # The writer reads its own root back as every reader will, so that it never commits
        # what a reader refuses (too deep metadata, limits, schema). Only the chunk lists are
        # unknown yet: zeros of their final length stand for them, so the document checked
        # here has the size and structure of the one published (R3.19).
        root = with_chunk_lists(manifest, {}).root_bytes()
        check_root_document(root, f"the root zarr.json for {storage.location}")
        storage.claim(dumps(claim_document(manifest)))
    except TesseraError as exc:
        return [_Instruction(exc, None)] * world_size, None
    instructions = [_Instruction(None, rank_plans[r]) for r in range(world_size)]
    return instructions, _Pending(manifest, plan.ranks, root)


def _global_plan(
    reports: list[_Report], options: SaveOptions, cache: PlanCache | None
) -> tuple[GlobalPlan, list[RankPlan | None]]:
    cached = _reusable(reports, cache)
    if cached is not None:
        return cached, [None] * len(reports)
    arrays = [r.arrays for r in reports if r.arrays is not None]
    digests = tuple(r.digest for r in reports if r.digest is not None)
    if not len(arrays) == len(digests) == len(reports):
        raise CollectiveError("a rank sent no layout although none failed and no cached plan fits")
    plan = make_global_plan(arrays, options)
    if cache is not None:
        cache.plan, cache.all_digests = plan, digests
    return plan, list(plan.ranks)


def _commit(
    statuses: list[tuple[TesseraError | None, bytes | None]], storage: Storage, pending: _Pending
) -> _Outcome:
    """Rank 0: publish the root only if every rank's data is durable, with the chunk lists
    built from the CRCs the ranks report (R3.19) and sealed with its digest (R3.20)."""
    failed = [(rank, e) for rank, (e, _) in enumerate(statuses) if e is not None]
    if failed:
        rank, error = failed[0]
        message = f"rank {rank} failed to write its data ({error}); the checkpoint was not committed"
        _remove_unpublished(storage, pending.manifest)
        return _Outcome(CollectiveError(message), None)
    try:
        crcs = [c for _, c in statuses]
        manifest = with_chunk_lists(pending.manifest, chunk_lists(pending.ranks, crcs))
        root = manifest.root_bytes()
        if not only_hex_digits_differ(pending.checked_root, root):
            raise CollectiveError(
                f"the root zarr.json for {storage.location} differs from the one checked before the "
                "claim in more than its chunk lists and digest; the checkpoint was not committed"
            )
        storage.publish_root(root, manifest.save_id)
    except TesseraError as exc:
        _remove_unpublished(storage, pending.manifest)
        return _Outcome(exc, None)
    return _Outcome(None, manifest)


def _remove_unpublished(storage: Storage, manifest: Manifest) -> None:
    """Rank 0, after a failure once every rank has stopped writing: remove this save's files (R9.7).

    Only this save's own (its claim's ``save_id``), never a committed checkpoint; if that
    fails the save's error still stands, and the leftover is reported as a warning.
    """
    try:
        storage.remove_unpublished(manifest.save_id)
    except (TesseraError, OSError) as exc:
        warnings.warn(
            f"{storage.location}: the failed save's partial files could not be removed ({exc}); "
            "delete the uncommitted directory",
            TesseraWarning,
            stacklevel=3,
        )


def claim_document(manifest: Manifest) -> dict[str, Any]:
    """The claim file's content (``claim.schema.json``): the save it belongs to."""
    return {
        "format": FORMAT_NAME,
        "save_id": manifest.save_id,
        "created": manifest.created,
        "writer": {"name": manifest.writer.name, "version": manifest.writer.version},
    }
