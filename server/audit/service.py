"""AuditLog: the audit domain — group commit, checkpoints, proofs, queries, export.

Three ways in. `offer`/`put` take an access entry into a bounded in-memory queue: `offer` never
waits (the hot path), `put` waits while the queue is full (back-pressure; counted).
`record_nowait` is for calls that cannot wait (cancelled ones): with a full queue their entry is
held in a side list the writer takes first, never lost. `commit` takes entries and returns only
once they are durably committed, with their indexes ("no audit, no action" for security-class
calls and appended events).

One writer task per process drains the queue: it takes what is waiting (up to `batch_max`
entries, lingering `linger` seconds for a short batch, or `access_linger` when nobody waits for
any entry in it) and appends it in one transaction
(`AuditStore.append`: a per-tenant advisory lock, the entries, the completed Merkle nodes, the
new size). Then it resolves the waiting callers. A batch that fails because the database is
unreachable fails its durable callers with AUDIT_UNAVAILABLE and is retried with back-off (its
entries are never dropped), so an entry a client was told about is never lost, and the queue
bound turns a long outage into back-pressure. A retry is idempotent: the batch carries a random
id, stored with its first entry under a unique index, and the store checks for it under the log
lock, so a retry after a commit whose answer was lost (the connection died after COMMIT) finds
it instead of appending its entries twice. A batch the database *rejects* (`BatchRejected`:
something in it can never be stored) is split in halves until the rejected items are alone;
their callers get AUDIT_ENTRY_REJECTED, the entries are counted and a gap entry records them,
and everything else commits — one poison entry cannot stall the writer for every tenant.

Proofs are read from stored perfect-subtree nodes. The `merkle` functions take a synchronous
`node(level, index)` reader, and which nodes they read depends only on the sizes and indexes,
never on the hashes: `_with_nodes` runs a computation once with a recording reader to learn the
nodes it needs, fetches them in one query, and runs it again with the real ones.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Collection, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import grpc
import prometheus_client as prom
from trustplane.common.v1 import error_reason_pb2 as reasons

from server import wire
from server.actor import ActorContext
from server.audit import merkle
from server.audit.model import (
    ACCESS,
    EVENT,
    GAP,
    SECURITY,
    BatchRejected,
    EntryFilter,
    EventInput,
    Record,
    Settings,
    StoredEntry,
    log_id,
)
from server.audit.subjects import Subjects
from server.config import AuditConfig
from server.crypto.model import Algorithm, Key
from server.errors import (
    EtagMismatch,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    TrustplaneError,
    Unavailable,
)
from server.page_token import PageTokens, page_size

_log = logging.getLogger("trustplane.audit")
_T = TypeVar("_T")

SIGNING_TENANT = "_audit"
SIGNING_KEY = "checkpoints"
MAX_EVENTS = 256  # per request or stream message: never more than one group commit holds
MAX_STREAM_EVENTS = 100_000
MAX_SUBJECT = 256
MAX_ATTRIBUTE_BYTES = 64 * 1024
EXPORT_CHUNK = 256
_EVENT_TYPE = re.compile(r"^[a-z0-9._-]{1,64}$")
_CODES = {code.name for code in grpc.StatusCode}
_DUMMY = bytes(merkle.HASH_SIZE)
_RETRY_DELAYS = (0.05, 0.2, 0.5, 1.0, 2.0)
_QUEUE_FULL = "AUDIT_QUEUE_FULL"  # gap reasons
_REJECTED = "AUDIT_ENTRY_REJECTED"


class AuditUnavailable(Unavailable):
    reason = reasons.ERROR_REASON_AUDIT_UNAVAILABLE
    default_message = "the audit entry could not be committed; retry with the same request id"


class AuditEntryRejected(TrustplaneError):
    code = grpc.StatusCode.INTERNAL
    reason = reasons.ERROR_REASON_AUDIT_ENTRY_REJECTED
    default_message = "the audit entry could not be stored; the answer is withheld"


class LogInconsistent(TrustplaneError):
    code = grpc.StatusCode.DATA_LOSS
    reason = reasons.ERROR_REASON_AUDIT_LOG_INCONSISTENT
    default_message = "the audit log does not match an earlier signed checkpoint"


class AuditStore(Protocol):
    """What AuditLog needs from storage (PgAuditStore)."""

    async def append(
        self, groups: Mapping[str, Sequence[Record]], batch: bytes
    ) -> dict[str, int]: ...
    async def size(self, tenant_id: str) -> int: ...
    async def nodes(
        self, tenant_id: str, wanted: Collection[tuple[int, int]]
    ) -> dict[tuple[int, int], bytes]: ...
    async def entries(
        self, tenant_id: str, where: EntryFilter, after: int, limit: int
    ) -> list[StoredEntry]: ...
    async def range(self, tenant_id: str, start: int, end: int) -> list[StoredEntry]: ...
    async def latest_checkpoint(self, tenant_id: str) -> merkle.SignedCheckpoint | None: ...
    async def save_checkpoint(self, tenant_id: str, signed: merkle.SignedCheckpoint) -> None: ...
    async def stale_logs(self) -> list[str]: ...
    async def expire(self, now_ms: int, default_days: int) -> int: ...
    async def subject_entries(
        self, tenant_id: str, ref: str | None, principal: str, after: int, limit: int
    ) -> list[tuple[StoredEntry, str]]: ...
    async def settings(self, tenant_id: str) -> Settings | None: ...
    async def put_settings(
        self, tenant_id: str, retention_days: int, expected_revision: int | None
    ) -> Settings | None: ...


class Signer(Protocol):
    """The Crypto service's signing API (KeyManager)."""

    async def ensure_signing_key(self, tenant_id: str, name: str, algorithm: Algorithm) -> Key: ...
    async def sign(self, tenant_id: str, name: str, message: bytes) -> tuple[bytes, int, str]: ...
    async def public_key(
        self, tenant_id: str, name: str, version: int
    ) -> tuple[str, dict[str, Any], Key, int]: ...


@dataclass
class _Item:
    records: Sequence[Record]
    done: asyncio.Future[int] | None = None  # set: a durable caller waits for the first index
    queued: bool = True  # False: a gap entry the writer added itself (not tracked)


@dataclass
class _Drops:
    """Entries of one tenant dropped (for one reason) since the last gap entry."""

    count: int
    first_ms: int
    last_ms: int


@dataclass(frozen=True)
class SubjectEntry:
    """An entry about a data subject, with its personal data decrypted when still readable."""

    entry: StoredEntry
    data_subject_ref: str
    personal_data: dict[str, str] | None
    erased: bool


@dataclass(frozen=True)
class InclusionProof:
    index: int
    tree_size: int
    leaf_hash: bytes
    hashes: list[bytes]
    root: bytes
    checkpoint: merkle.SignedCheckpoint | None = None


@dataclass(frozen=True)
class ConsistencyProof:
    first_size: int
    second_size: int
    hashes: list[bytes]
    first_root: bytes
    second_root: bytes
    checkpoint: merkle.SignedCheckpoint | None = None


@dataclass
class _Metrics:
    registry: prom.CollectorRegistry | None
    batch: prom.Histogram = field(init=False)
    commit: prom.Histogram = field(init=False)
    waits: prom.Counter = field(init=False)
    failures: prom.Counter = field(init=False)
    dropped: prom.Counter = field(init=False)
    rejected: prom.Counter = field(init=False)
    spilled: prom.Counter = field(init=False)

    def __post_init__(self) -> None:
        r = self.registry
        self.batch = prom.Histogram(
            "trustplane_audit_batch_entries",
            "Entries per audit group commit.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1024),
            registry=r,
        )
        self.commit = prom.Histogram(
            "trustplane_audit_commit_seconds",
            "Audit group commit latency.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2),
            registry=r,
        )
        self.waits = prom.Counter(
            "trustplane_audit_backpressure_waits",
            "Access entries that waited for room in the full audit queue.",
            registry=r,
        )
        self.failures = prom.Counter(
            "trustplane_audit_commit_failures", "Audit batches that failed to commit.", registry=r
        )
        self.dropped = prom.Counter(
            "trustplane_audit_dropped_entries",
            "Access entries dropped because the queue was full (TRUSTPLANE_AUDIT_OVERFLOW=drop);"
            " each run of drops leaves a gap entry in the log.",
            registry=r,
        )
        self.spilled = prom.Counter(
            "trustplane_audit_spilled_entries",
            "Entries of cancelled calls that found the queue full: held outside it, never"
            " dropped (unless an access entry with TRUSTPLANE_AUDIT_OVERFLOW=drop).",
            registry=r,
        )
        self.rejected = prom.Counter(
            "trustplane_audit_rejected_entries",
            "Entries the database refused to store (their callers failed with"
            " AUDIT_ENTRY_REJECTED); each run leaves a gap entry in the log.",
            registry=r,
        )


class AuditLog:
    """See the module docstring."""

    def __init__(
        self,
        store: AuditStore,
        signer: Signer,
        config: AuditConfig,
        page_tokens: PageTokens,
        *,
        clock: Callable[[], float] = time.time,
        registry: prom.CollectorRegistry | None = None,
        subjects: Subjects | None = None,
    ) -> None:
        self._store = store
        self._subjects = subjects
        self._drops: dict[str, _Drops] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._urgent = asyncio.Event()
        self._signer = signer
        self._config = config
        self._page_tokens = page_tokens
        self._clock = clock
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(config.queue_size)
        self._writer: asyncio.Task[None] | None = None
        self._carry: _Item | None = None  # taken from the queue, first in the next batch
        self._spill: collections.deque[_Item] = collections.deque()  # see record_nowait
        self._pending = 0  # items queued, spilled or being written (flush waits for 0)
        self._idle = asyncio.Event()
        self._idle.set()
        self._followers: dict[str, set[asyncio.Event]] = {}  # followed exports, by tenant
        self._stopping = asyncio.Event()
        self._metrics = _Metrics(registry)
        self._key_ready = False

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self._writer = asyncio.create_task(self._write_forever(), name="audit-writer")

    async def close(self, timeout: float = 10.0) -> None:
        """Flush what is queued (for at most `timeout` seconds), then stop the writer."""
        self.stop_following()
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            await asyncio.wait_for(self.flush(), timeout)
        except TimeoutError:
            _log.error("audit queue not flushed at shutdown", extra={"queued": self.depth()})
        writer.cancel()
        await asyncio.gather(writer, *self._background, return_exceptions=True)

    async def flush(self) -> None:
        """Wait until everything queued so far is committed."""
        await self._idle.wait()

    def depth(self) -> int:
        """Items waiting for the writer (one per access entry, one per durable request)."""
        return self._queue.qsize() + len(self._spill) + (self._carry is not None)

    def _track(self) -> None:
        """One more item for the writer (queued, spilled or waiting to be)."""
        self._pending += 1
        self._idle.clear()

    def _untrack(self, count: int) -> None:
        self._pending -= count
        if not self._pending:
            self._idle.set()

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    # --- recording ------------------------------------------------------------------------

    def offer(self, record: Record) -> bool:
        """Queue an access entry without waiting; False when the queue is full."""
        try:
            self._queue.put_nowait(_Item((record,)))
        except asyncio.QueueFull:
            return False
        self._track()
        if self._queue.qsize() >= self._config.batch_max:
            self._urgent.set()
        return True

    async def put(self, record: Record) -> None:
        """Queue an access entry, waiting for room (back-pressure); with overflow "drop", a
        full queue drops it instead and the writer later records a gap entry."""
        if self._config.overflow == "drop" and self._queue.full():
            self._drop(record)
            return
        self._metrics.waits.inc()
        self._urgent.set()  # the queue is full: no reason to linger
        await self._queue.put(_Item((record,)))
        self._track()

    def record_nowait(self, record: Record) -> None:
        """Queue the entry of a call that cannot wait (it was cancelled), never losing it: into
        the queue when it has room; else, for an access entry with overflow "drop", dropped like
        any other (counted, gap entry); else into the spill list, which the writer takes before
        the queue. The spill list holds at most one entry per cancelled call, so it is bounded by
        the calls in flight."""
        if self.offer(record):
            return
        if record.audit_class == ACCESS and self._config.overflow == "drop":
            self._drop(record)
            return
        self._metrics.spilled.inc()
        self._spill.append(_Item((record,)))
        self._track()
        self._urgent.set()

    def _drop(self, record: Record) -> None:
        self._metrics.dropped.inc()
        drops = self._drops.get(record.tenant_id)
        if drops is None:
            self._drops[record.tenant_id] = _Drops(1, record.time_ms, record.time_ms)
        else:
            drops.count += 1
            drops.last_ms = record.time_ms

    async def commit(self, records: Sequence[Record]) -> list[int]:
        """Append `records` (one tenant, in order); return once durable, with their indexes."""
        return await self._committed(await self._enqueue(records), len(records))

    async def _enqueue(self, records: Sequence[Record]) -> asyncio.Future[int]:
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Item(records, done))
        self._track()
        self._urgent.set()  # someone waits for this one: end an access-only linger
        return done

    @staticmethod
    async def _committed(done: asyncio.Future[int], count: int) -> list[int]:
        first = await done
        return list(range(first, first + count))

    async def _write_forever(self) -> None:
        """Take batches and commit them, up to `pipeline` at once: the next batch is taken and
        sent while earlier ones are still committing (the store orders them per log). A
        batch is taken only once a slot is free, so what arrives meanwhile joins it."""
        running: set[asyncio.Task[None]] = set()
        try:
            while True:
                while len(running) >= self._config.pipeline:
                    await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                batch = await self._take()
                task = asyncio.create_task(self._settle_counted(batch))
                running.add(task)
                task.add_done_callback(running.discard)
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _settle_counted(self, batch: list[_Item]) -> None:
        try:
            await self._settle(batch)
        except Exception:  # `_settle` retries every failure; this is a bug, never silent
            _log.exception("audit batch abandoned", extra={"items": len(batch)})
            _fail(batch)
        finally:  # `flush` must not wait forever for a batch that is gone
            self._untrack(sum(1 for item in batch if item.queued))

    async def _settle(self, batch: list[_Item]) -> None:
        """Commit `batch`, retrying while the database is unavailable (idempotently: every
        attempt carries the same batch id); a rejected batch is split until what the database
        refuses is alone, and that is given up (`_reject`)."""
        batch_id = secrets.token_bytes(16)
        failures = 0
        while True:
            try:
                await self._write(batch, batch_id)
                return
            except BatchRejected as rejected:
                self._metrics.failures.inc()
                if len(batch) == 1:
                    await self._reject(batch[0], rejected)
                    return
                # Rolled back for sure (the database refused it): the halves are new batches.
                half = len(batch) // 2
                await self._settle(batch[:half])
                await self._settle(batch[half:])
                return
            except Exception:
                self._metrics.failures.inc()
                _log.exception("audit commit failed; will retry", extra={"entries": len(batch)})
                _fail(batch)
                await asyncio.sleep(_RETRY_DELAYS[min(failures, len(_RETRY_DELAYS) - 1)])
                failures += 1

    async def _reject(self, item: _Item, rejected: BatchRejected) -> None:
        """Give up an item the database refuses: its caller gets a typed error, and the entries
        are counted and leave a gap entry at once (unless the item is itself a gap entry)."""
        first = item.records[0]
        _log.error(
            "audit entries rejected by the database; recorded as a gap",
            extra={
                "tenant": first.tenant_id,
                "method": first.method,
                "entries": len(item.records),
                "error": rejected.cause,
            },
        )
        self._metrics.rejected.inc(len(item.records))
        if item.done is not None and not item.done.done():
            item.done.set_exception(AuditEntryRejected())
        if item.queued:
            times = [record.time_ms for record in item.records]
            missing = _Drops(len(times), min(times), max(times))
            gap = self._gap(first.tenant_id, _REJECTED, missing)
            await self._settle([_Item((gap,), queued=False)])

    async def _take(self) -> list[_Item]:
        """The next batch: at most `batch_max` entries, lingering for more when short. An item
        is never split (one request's entries commit together); one that does not fit waits
        for the next batch (`_carry`), and gap entries fill what room is left."""
        batch: list[_Item] = []
        if self._carry is not None:
            batch.append(self._carry)
            self._carry = None
        elif self._spill:
            batch.append(self._spill.popleft())
        elif not (self._drops and self._queue.empty()):
            batch.append(await self._queue.get())
        count = self._drain(batch, sum(len(item.records) for item in batch))
        if batch and count < self._config.batch_max and self._carry is None:
            durable = any(item.done is not None for item in batch)
            linger = self._config.linger if durable else self._config.access_linger
            if durable and linger > 0:
                await asyncio.sleep(linger)
            elif linger > 0:
                self._urgent.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._urgent.wait(), linger)
            count = self._drain(batch, count)
        for tenant_id in list(self._drops)[: max(0, self._config.batch_max - count)]:
            gap = self._gap(tenant_id, _QUEUE_FULL, self._drops.pop(tenant_id))
            batch.append(_Item((gap,), queued=False))
        return batch

    def _gap(self, tenant_id: str, reason: str, drops: _Drops) -> Record:
        """The entry that says where entries are missing, why and how many."""
        return Record(
            tenant_id=tenant_id,
            kind=GAP,
            time_ms=self.now_ms(),
            method="",
            code="",
            reason=reason,
            attributes={
                "dropped": str(drops.count),
                "first_dropped_ms": str(drops.first_ms),
                "last_dropped_ms": str(drops.last_ms),
            },
            audit_class=ACCESS,
        )

    def _drain(self, batch: list[_Item], count: int) -> int:
        while self._carry is None and count < self._config.batch_max:
            if self._spill:
                item = self._spill.popleft()
            elif not self._queue.empty():
                item = self._queue.get_nowait()
            else:
                break
            if batch and count + len(item.records) > self._config.batch_max:
                self._carry = item  # would overflow the batch: first in the next one
                break
            batch.append(item)
            count += len(item.records)
        return count

    async def _write(self, batch: list[_Item], batch_id: bytes) -> None:
        groups: dict[str, list[Record]] = {}
        offsets = []
        for item in batch:
            group = groups.setdefault(item.records[0].tenant_id, [])
            offsets.append(len(group))
            group.extend(item.records)
        started = time.perf_counter()
        firsts = await self._store.append(groups, batch_id)
        self._metrics.commit.observe(time.perf_counter() - started)
        self._metrics.batch.observe(sum(len(g) for g in groups.values()))
        for item, offset in zip(batch, offsets, strict=True):
            if item.done is not None and not item.done.done():
                item.done.set_result(firsts[item.records[0].tenant_id] + offset)
        for tenant_id in groups:
            for wake in self._followers.get(tenant_id, ()):
                wake.set()
        every = self._config.checkpoint_entries
        for tenant_id, group in groups.items():
            first = firsts[tenant_id]
            if every and (first + len(group)) // every > first // every:
                self._spawn(self._checkpoint_quietly(tenant_id))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _checkpoint_quietly(self, tenant_id: str) -> None:
        """A checkpoint because the log passed a multiple of `checkpoint_entries`."""
        try:
            await self.checkpoint(tenant_id)
        except Exception:  # the periodic job signs it later; never break the writer
            _log.exception("audit checkpoint failed", extra={"tenant": tenant_id})

    # --- appended events --------------------------------------------------------------------

    async def append_events(
        self,
        actor: ActorContext,
        events: Sequence[EventInput],
        *,
        method: str,
        request_id: str,
        peer: str,
        include_checkpoint: bool,
    ) -> tuple[list[int], merkle.SignedCheckpoint | None]:
        """Validate and durably append a runtime's events; the actor comes from its credential."""
        records = await self._event_records(actor, events, "", method, request_id, peer)
        indexes = await self.commit(records)
        checkpoint = await self.checkpoint(actor.tenant_id) if include_checkpoint else None
        return indexes, checkpoint

    async def append_stream(
        self,
        actor: ActorContext,
        messages: AsyncIterator[tuple[Sequence[EventInput], bool]],
        *,
        method: str,
        request_id: str,
        peer: str,
    ) -> tuple[list[int], merkle.SignedCheckpoint | None]:
        """Append each message's events as it arrives, in order, without waiting for earlier
        ones to commit; answer once all are durable. A rejected message stops the stream, after
        what was already accepted is committed."""
        pending: list[tuple[asyncio.Future[int], int]] = []
        include_checkpoint = False
        total = 0
        try:
            i = 0
            async for events, wants_checkpoint in messages:
                if i == 0:
                    include_checkpoint = wants_checkpoint
                total += len(events)
                if total > MAX_STREAM_EVENTS:
                    raise InvalidArgument.fields(
                        FieldViolation("messages", f"at most {MAX_STREAM_EVENTS} events per stream")
                    ).with_reason(reasons.ERROR_REASON_REQUEST_TOO_LARGE)
                records = await self._event_records(
                    actor, events, f"messages[{i}].", method, request_id, peer
                )
                pending.append((await self._enqueue(records), len(records)))
                i += 1
        finally:
            results = await asyncio.gather(
                *(self._committed(done, count) for done, count in pending), return_exceptions=True
            )
        indexes: list[int] = []
        for result in results:
            if isinstance(result, BaseException):
                raise result
            indexes.extend(result)
        if not indexes:
            raise InvalidArgument.fields(FieldViolation("events", "at least one event is required"))
        checkpoint = await self.checkpoint(actor.tenant_id) if include_checkpoint else None
        return indexes, checkpoint

    async def _event_records(
        self,
        actor: ActorContext,
        events: Sequence[EventInput],
        prefix: str,
        method: str,
        request_id: str,
        peer: str,
    ) -> list[Record]:
        _check_events(events, prefix)
        records = _event_records(actor, events, self.now_ms(), method, request_id, peer)
        now = records[0].time_ms
        if any(e.data_subject for e in events):
            subjects = self._require_subjects()
            for i, event in enumerate(events):
                if event.data_subject:
                    ref, sealed = await subjects.seal(
                        actor.tenant_id, event.data_subject, event.personal_data, now
                    )
                    records[i] = dataclasses.replace(records[i], data_subject=ref, personal=sealed)
        return records

    def _require_subjects(self) -> Subjects:
        if self._subjects is None:
            raise FailedPrecondition("personal data is not enabled on this server")
        return self._subjects

    # --- data subjects ------------------------------------------------------------------------

    async def erase_subject(self, tenant_id: str, subject: str) -> tuple[int, int]:
        """Crypto-shred a data subject's personal data; returns (entries affected, time ms)."""
        _check_subject(subject)
        now = self.now_ms()
        return await self._require_subjects().erase(tenant_id, subject, now), now

    async def export_subject(
        self, tenant_id: str, subject: str
    ) -> AsyncIterator[list[SubjectEntry]]:
        """Every entry about `subject`, in index order, personal data decrypted where readable."""
        _check_subject(subject)
        subjects = self._require_subjects()
        ref = await subjects.ref(tenant_id, subject)
        after = -1
        while True:
            rows = await self._store.subject_entries(tenant_id, ref, subject, after, EXPORT_CHUNK)
            if not rows:
                return
            chunk = []
            for entry, entry_ref in rows:
                personal = None
                sealed = _personal(entry)
                if entry_ref and sealed is not None:
                    personal = await subjects.open(tenant_id, entry_ref, sealed)
                erased = bool(entry_ref) and personal is None
                chunk.append(SubjectEntry(entry, entry_ref, personal, erased))
            yield chunk
            after = rows[-1][0].index

    # --- settings -----------------------------------------------------------------------------

    async def settings(self, tenant_id: str) -> Settings:
        found = await self._store.settings(tenant_id)
        return found or Settings(self._config.retention_days, 0)

    async def update_settings(self, tenant_id: str, retention_days: int, etag: str) -> Settings:
        if not 1 <= retention_days <= 3650:
            raise InvalidArgument.fields(
                FieldViolation("settings.retention_days", "must be between 1 and 3650")
            )
        revision = wire.revision(etag, "settings.etag")
        updated = await self._store.put_settings(tenant_id, retention_days, revision)
        if updated is None:
            raise EtagMismatch()
        return updated

    # --- checkpoints and proofs -----------------------------------------------------------

    async def checkpoint(self, tenant_id: str) -> merkle.SignedCheckpoint:
        """A signed checkpoint at the log's current size (reused if nothing was added).

        Before signing a new one, the stored tree must still produce the root of the latest
        checkpoint: a tree edited in the database is never signed over.
        """
        size = await self._store.size(tenant_id)
        latest = await self._store.latest_checkpoint(tenant_id)
        if latest is not None and latest.checkpoint.size == size:
            return latest
        if latest is not None:
            await self._require_root(tenant_id, latest.checkpoint, size)
        root = await self._with_nodes(tenant_id, lambda node: merkle.root_from_nodes(size, node))
        body = merkle.Checkpoint(log_id(tenant_id), size, root, self.now_ms())
        signature, kid = await self._sign(body.body())
        signed = merkle.SignedCheckpoint(body, kid, signature)
        await self._store.save_checkpoint(tenant_id, signed)
        return signed

    async def _sign(self, body: bytes) -> tuple[bytes, str]:
        """Sign with the server's checkpoint key, created on first use."""
        if not self._key_ready:
            await self._signer.ensure_signing_key(SIGNING_TENANT, SIGNING_KEY, Algorithm.ED25519)
            self._key_ready = True
        signature, _version, kid = await self._signer.sign(SIGNING_TENANT, SIGNING_KEY, body)
        return signature, kid

    async def _require_root(self, tenant_id: str, earlier: merkle.Checkpoint, size: int) -> None:
        if earlier.size > size:
            raise LogInconsistent()
        root = await self._with_nodes(
            tenant_id, lambda node: merkle.root_from_nodes(earlier.size, node)
        )
        if root != earlier.root:
            raise LogInconsistent()

    async def public_key_pem(self, key_id: str) -> str:
        """The PEM of the key version named by a checkpoint's key id ("<key id>.<version>")."""
        version = int(key_id.rpartition(".")[2] or 0)
        pem, _jwk, _key, _version = await self._signer.public_key(
            SIGNING_TENANT, SIGNING_KEY, version
        )
        return pem

    async def checkpoints_due(self) -> None:
        """Sign a checkpoint for every log that grew (the periodic job)."""
        for tenant_id in await self._store.stale_logs():
            await self.checkpoint(tenant_id)

    async def inclusion_proof(self, tenant_id: str, index: int, size: int) -> InclusionProof:
        signed, size = await self._size_or_checkpoint(tenant_id, size, "tree_size")
        if not 0 <= index < size:
            raise InvalidArgument.fields(FieldViolation("index", f"must be in 0..{size - 1}"))

        def compute(node: merkle.NodeReader) -> tuple[bytes, list[bytes], bytes]:
            path = merkle.inclusion_proof(index, size, node)
            return node(0, index), path, merkle.root_from_nodes(size, node)

        leaf, path, root = await self._with_nodes(tenant_id, compute)
        return InclusionProof(index, size, leaf, path, root, signed)

    async def consistency_proof(self, tenant_id: str, first: int, second: int) -> ConsistencyProof:
        signed, second = await self._size_or_checkpoint(tenant_id, second, "second_tree_size")
        if not 0 <= first <= second:
            raise InvalidArgument.fields(
                FieldViolation("first_tree_size", f"must be in 0..{second}")
            )

        def compute(node: merkle.NodeReader) -> tuple[list[bytes], bytes, bytes]:
            path = merkle.consistency_proof(first, second, node)
            return path, merkle.root_from_nodes(first, node), merkle.root_from_nodes(second, node)

        path, first_root, second_root = await self._with_nodes(tenant_id, compute)
        return ConsistencyProof(first, second, path, first_root, second_root, signed)

    async def _size_or_checkpoint(
        self, tenant_id: str, size: int, name: str
    ) -> tuple[merkle.SignedCheckpoint | None, int]:
        """0 means "now": a fresh checkpoint names the size. Otherwise it must exist."""
        if size == 0:
            signed = await self.checkpoint(tenant_id)
            return signed, signed.checkpoint.size
        current = await self._store.size(tenant_id)
        if not 0 < size <= current:
            raise InvalidArgument.fields(FieldViolation(name, f"must be in 1..{current}"))
        return None, size

    async def _with_nodes(self, tenant_id: str, compute: Callable[[merkle.NodeReader], _T]) -> _T:
        wanted: set[tuple[int, int]] = set()

        def record(level: int, index: int) -> bytes:
            wanted.add((level, index))
            return _DUMMY

        compute(record)
        found = await self._store.nodes(tenant_id, wanted)

        def read(level: int, index: int) -> bytes:
            try:
                return found[(level, index)]
            except KeyError:
                raise LogInconsistent() from None

        return compute(read)

    # --- queries and export -----------------------------------------------------------------

    async def list_entries(
        self, tenant_id: str, where: EntryFilter, size: int, token: str
    ) -> tuple[list[StoredEntry], str]:
        start, end = where.start_ms, where.end_ms
        if start is not None and end is not None and end < start:
            raise InvalidArgument.fields(FieldViolation("end_time", "must not precede start_time"))
        limit = page_size(size)
        query = f"audit.ListEntries\0{tenant_id}\0{where.fingerprint()}"
        after = int(self._page_tokens.decode(query, token)["after"]) if token else -1
        entries = await self._store.entries(tenant_id, where, after, limit + 1)
        if len(entries) <= limit:
            return entries, ""
        return entries[:limit], self._page_tokens.encode(query, {"after": entries[limit - 1].index})

    async def export(
        self, tenant_id: str, start: int, *, follow: bool = False
    ) -> AsyncIterator[list[str]]:
        """NDJSON lines (docs/audit-format.md): a checkpoint, then entries with their proofs;
        with `follow`, then the log's growth (`_follow`) until the server stops."""
        if start < 0:
            raise InvalidArgument.fields(FieldViolation("start_index", "must not be negative"))
        signed = await self.checkpoint(tenant_id)
        size = signed.checkpoint.size
        header = {"type": "checkpoint", "start_index": start, "complete": start == 0}
        yield [_line({**header, **signed.to_dict()})]
        async for lines in self._entry_lines(tenant_id, start, size):
            yield lines
        if follow:
            async for lines in self._follow(tenant_id, signed, start):
                yield lines

    async def _entry_lines(self, tenant_id: str, low: int, size: int) -> AsyncIterator[list[str]]:
        """The entries from `low` below `size`, in chunks, with proofs in the tree of `size`."""
        for start in range(low, size, EXPORT_CHUNK):
            entries = await self._store.range(tenant_id, start, min(start + EXPORT_CHUNK, size))
            yield await self._export_lines(tenant_id, entries, size)

    async def _follow(
        self, tenant_id: str, signed: merkle.SignedCheckpoint, start: int
    ) -> AsyncIterator[list[str]]:
        """Each time the log grows: a new signed checkpoint with the consistency proof from the
        previous one (so a follower knows the log was only appended to), then the new entries
        with their inclusion proofs against it. At most one checkpoint per `tail_interval`;
        this process's commits wake the stream, other processes' appends are polled for."""
        wake = asyncio.Event()
        self._followers.setdefault(tenant_id, set()).add(wake)
        try:
            while await self._grown(tenant_id, signed.checkpoint.size, wake):
                previous, signed = signed, await self.checkpoint(tenant_id)
                yield [await self._extension_line(tenant_id, previous.checkpoint.size, signed)]
                low = max(start, previous.checkpoint.size)
                async for lines in self._entry_lines(tenant_id, low, signed.checkpoint.size):
                    yield lines
                await self._pause(self._config.tail_interval)
        finally:
            followers = self._followers.get(tenant_id, set())
            followers.discard(wake)
            if not followers:
                self._followers.pop(tenant_id, None)

    async def _extension_line(
        self, tenant_id: str, old: int, signed: merkle.SignedCheckpoint
    ) -> str:
        """A followed export's checkpoint line: `signed`, proven to extend the log at `old`."""
        new = signed.checkpoint.size
        proof = await self._with_nodes(
            tenant_id, lambda node: merkle.consistency_proof(old, new, node)
        )
        head = {"type": "checkpoint", "start_index": old, "complete": False}
        return _line({**head, "consistency": [_b64(h) for h in proof], **signed.to_dict()})

    async def _grown(self, tenant_id: str, size: int, wake: asyncio.Event) -> bool:
        """Wait until the log holds more than `size` entries; False once the server stops."""
        while not self._stopping.is_set():
            wake.clear()
            if await self._store.size(tenant_id) > size:
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), self._config.tail_interval)
        return False

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    def stop_following(self) -> None:
        """Shutting down: followed exports end cleanly now (OK) instead of holding the
        server's grace period."""
        self._stopping.set()
        for followers in self._followers.values():
            for wake in followers:
                wake.set()

    async def _export_lines(
        self, tenant_id: str, entries: Sequence[StoredEntry], size: int
    ) -> list[str]:
        def compute(node: merkle.NodeReader) -> list[list[bytes]]:
            return [merkle.inclusion_proof(e.index, size, node) for e in entries]

        proofs = await self._with_nodes(tenant_id, compute)
        return [_entry_line(e, p) for e, p in zip(entries, proofs, strict=True)]

    async def expire(self) -> None:
        """Retention: remove the bodies of entries older than their tenant's retention."""
        removed = await self._store.expire(self.now_ms(), self._config.retention_days)
        if removed:
            _log.info("audit retention removed entry bodies", extra={"entries": removed})


def _check_subject(subject: str) -> None:
    if not 1 <= len(subject) <= MAX_SUBJECT:
        raise InvalidArgument.fields(
            FieldViolation("data_subject", f"must be 1-{MAX_SUBJECT} characters")
        )


def _personal(entry: StoredEntry) -> str | None:
    """The sealed personal data in an entry's body (None once retention removed the body)."""
    if entry.body is None:
        return None
    personal = json.loads(entry.body).get("personal")
    return None if personal is None else str(personal["ciphertext"])


def _fail(batch: Sequence[_Item]) -> None:
    for item in batch:
        if item.done is not None and not item.done.done():
            item.done.set_exception(AuditUnavailable())
            item.done = None  # retried in the background; nobody waits any more


def _line(value: Mapping[str, Any]) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _entry_line(entry: StoredEntry, proof: Sequence[bytes]) -> str:
    return _line(
        {
            "type": "entry",
            "index": entry.index,
            "leaf_hash": _b64(entry.leaf_hash),
            "proof": [_b64(h) for h in proof],
            "body": entry.body,
        }
    )


def _check_events(events: Sequence[EventInput], prefix: str = "") -> None:
    if not events:
        raise InvalidArgument.fields(
            FieldViolation(f"{prefix}events", "at least one event is required")
        )
    if len(events) > MAX_EVENTS:
        raise InvalidArgument.fields(
            FieldViolation(f"{prefix}events", f"at most {MAX_EVENTS} events per call")
        ).with_reason(reasons.ERROR_REASON_REQUEST_TOO_LARGE)
    violations = [v for i, e in enumerate(events) for v in _event_violations(prefix, i, e)]
    if violations:
        too_large = any(v.description.startswith("larger") for v in violations)
        error = InvalidArgument.fields(*violations)
        raise error.with_reason(reasons.ERROR_REASON_REQUEST_TOO_LARGE) if too_large else error


def _event_violations(prefix: str, i: int, event: EventInput) -> list[FieldViolation]:
    if _plain_and_valid(event):
        return []
    at = f"{prefix}events[{i}]"
    found = []
    if not _EVENT_TYPE.match(event.event_type):
        found.append(FieldViolation(f"{at}.event_type", "must be 1-64 of [a-z0-9._-]"))
    if len(event.resource) > 256:
        found.append(FieldViolation(f"{at}.resource", "at most 256 characters"))
    if len(event.session_id) > 128:
        found.append(FieldViolation(f"{at}.session_id", "at most 128 characters"))
    if event.code and event.code not in _CODES:
        found.append(FieldViolation(f"{at}.code", "must be a gRPC status code name"))
    if any(not 1 <= len(k) <= 64 for k in event.attributes):
        found.append(FieldViolation(f"{at}.attributes", "keys must be 1-64 characters"))
    if sum(len(k) + len(v) for k, v in event.attributes.items()) > MAX_ATTRIBUTE_BYTES:
        found.append(FieldViolation(f"{at}.attributes", "larger than 64 KiB"))
    if len(event.data_subject) > MAX_SUBJECT:
        found.append(FieldViolation(f"{at}.data_subject", f"at most {MAX_SUBJECT} characters"))
    if event.personal_data and not event.data_subject:
        found.append(FieldViolation(f"{at}.data_subject", "required with personal_data"))
    if any(not 1 <= len(k) <= 64 for k in event.personal_data):
        found.append(FieldViolation(f"{at}.personal_data", "keys must be 1-64 characters"))
    if sum(len(k) + len(v) for k, v in event.personal_data.items()) > MAX_ATTRIBUTE_BYTES:
        found.append(FieldViolation(f"{at}.personal_data", "larger than 64 KiB"))
    return found


def _plain_and_valid(event: EventInput) -> bool:
    """The common case in one expression: a valid event without personal data, with a few
    small attributes (`_event_violations` checks everything else field by field)."""
    attributes = event.attributes
    return bool(
        _EVENT_TYPE.match(event.event_type)
        and len(event.resource) <= 256
        and len(event.session_id) <= 128
        and (not event.code or event.code in _CODES)
        and not event.data_subject
        and not event.personal_data
        and len(attributes) <= _PLAIN_ATTRIBUTES
        and all(0 < len(k) <= 64 and len(v) <= _PLAIN_VALUE for k, v in attributes.items())
    )


_PLAIN_ATTRIBUTES = 32  # 32 x (64 + 1024) bytes stay far below MAX_ATTRIBUTE_BYTES
_PLAIN_VALUE = 1024


def _event_records(
    actor: ActorContext,
    events: Sequence[EventInput],
    now: int,
    method: str,
    request_id: str,
    peer: str,
) -> list[Record]:
    """One record per event; what comes from the credential is computed once per call."""
    tenant_id, subject, session_id = actor.tenant_id, actor.subject, actor.session_id
    subject_type = actor.subject_type.value
    actors = actor.actors
    return [
        Record(
            tenant_id=tenant_id,
            kind=EVENT,
            time_ms=now,
            method=method,
            code=event.code or "OK",
            subject=subject,
            subject_type=subject_type,
            actors=actors,
            session_id=session_id or event.session_id,
            request_id=request_id,
            peer=peer,
            resource=event.resource,
            event_type=event.event_type,
            attributes=event.attributes,  # the event's own dict, never changed
            audit_class=SECURITY,
            occurred_at_ms=event.occurred_at_ms,
        )
        for event in events
    ]
