"""The audit writer against real PostgreSQL: group-commit limits and order, back-pressure
without loss, durable commits retried after a lost connection, checkpoints and proofs from the
stored nodes, and refusal to sign over an edited tree.

The writer is stalled the way a second server process would stall it: by holding the tenant
log's advisory lock from another connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from google.protobuf import field_mask_pb2
from trustplane.audit.v1 import audit_pb2 as pb

from server.audit import merkle
from server.audit.model import CALL, EntryFilter, Record, decode
from server.audit.service import AuditEntryRejected, AuditUnavailable, LogInconsistent
from server.audit.verify import verify_export
from tests.support.pg_proxy import LossyProxy
from tests.support.status import expect_error, rich
from tests.support.tokens import OTHER_TENANT, bearer
from tests.support.tokens import TENANT as TOKEN_TENANT

_LOCK_CLASS = 0x61756474
TENANT = "t-writer"
# The writer commits up to TRUSTPLANE_AUDIT_PIPELINE batches at once; tests that count what
# waits in the queue behind a stalled batch let only that one batch be in flight.
ONE_IN_FLIGHT = {"TRUSTPLANE_AUDIT_PIPELINE": "1"}


def record(tenant: str = TENANT, method: str = "/m") -> Record:
    return Record(tenant_id=tenant, kind=CALL, time_ms=1, method=method, code="OK")


@contextlib.asynccontextmanager
async def stalled(database_url: str, tenant: str = TENANT) -> AsyncIterator[asyncpg.Connection]:
    """Hold the tenant log's lock: the writer blocks inside its transaction until released."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("SELECT pg_advisory_lock($1, hashtext($2))", _LOCK_CLASS, tenant)
        yield conn
        await conn.execute("SELECT pg_advisory_unlock($1, hashtext($2))", _LOCK_CLASS, tenant)
    finally:
        await conn.close()


async def stored(running, tenant: str = TENANT) -> list[dict[str, Any]]:
    await running.app.audit.flush()
    entries, _ = await running.app.audit.list_entries(tenant, EntryFilter(), 1000, "")
    return [decode(e.body) for e in entries]


_WAITING = "application_name = 'trustplane' AND wait_event_type = 'Lock'"


async def writer_waits_on_lock(conn: asyncpg.Connection) -> None:
    """Until the writer is inside its transaction, waiting for the held log lock."""
    for _ in range(200):
        if await conn.fetchval(f"SELECT count(*) FROM pg_stat_activity WHERE {_WAITING}"):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the audit writer never waited on the log lock")


async def refuse_poison(database_url: str) -> None:
    """Make PostgreSQL refuse any entry whose resource is 'poison' (a constraint it breaks)."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "ALTER TABLE audit_entries ADD CONSTRAINT poison CHECK (resource <> 'poison')"
        )
    finally:
        await conn.close()


def batch_sizes(running) -> tuple[float, float]:
    registry = running.app.metrics.registry
    count = registry.get_sample_value("trustplane_audit_batch_entries_count") or 0.0
    at_most_8 = registry.get_sample_value("trustplane_audit_batch_entries_bucket", {"le": "8.0"})
    return count, at_most_8 or 0.0


async def test_group_commit_respects_batch_max_and_orders_entries(start_server, database_url):
    async with start_server(TRUSTPLANE_AUDIT_BATCH_MAX="8", TRUSTPLANE_AUDIT_LINGER="0") as running:
        log = running.app.audit
        before = batch_sizes(running)
        async with stalled(database_url):
            for i in range(30):
                assert log.offer(record(method=f"/m{i}"))
            await asyncio.sleep(0.1)
        entries = await stored(running)
        assert [e["method"] for e in entries] == [f"/m{i}" for i in range(30)]
        assert [e["index"] for e in entries] == list(range(30))
        count, small = batch_sizes(running)
        # Several batches, every one of them at most 8 entries (all batches since `before`).
        assert count - before[0] >= 4 and small - before[1] == count - before[0]


async def test_full_queue_means_back_pressure_not_loss(start_server, database_url):
    async with start_server(
        TRUSTPLANE_AUDIT_QUEUE_SIZE="2", TRUSTPLANE_AUDIT_LINGER="0", **ONE_IN_FLIGHT
    ) as running:
        log = running.app.audit
        async with stalled(database_url) as conn:
            assert log.offer(record(method="/first"))
            await writer_waits_on_lock(conn)
            accepted = [log.offer(record()) for _ in range(4)]
            assert accepted == [True, True, False, False]
            waiting = asyncio.create_task(log.put(record(method="/last")))
            await asyncio.sleep(0.1)
            assert not waiting.done()  # back-pressure: it waits for room
        await asyncio.wait_for(waiting, 10)
        entries = await stored(running)
        assert len(entries) == 4 and entries[-1]["method"] == "/last"
        waits = running.app.metrics.registry.get_sample_value(
            "trustplane_audit_backpressure_waits_total"
        )
        assert waits is not None and waits >= 1


async def test_durable_commit_fails_closed_and_is_retried_without_loss(start_server, database_url):
    async with start_server(TRUSTPLANE_AUDIT_LINGER="0") as running:
        log = running.app.audit
        assert await log.commit([record(), record()]) == [0, 1]
        assert await log.commit([record("t-other")]) == [0]
        async with stalled(database_url) as conn:
            pending = asyncio.create_task(log.commit([record(method="/lost-connection")]))
            await writer_waits_on_lock(conn)
            killed = await conn.fetchval(
                f"SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE {_WAITING}"
            )
            assert killed >= 1
            with pytest.raises(AuditUnavailable):
                await asyncio.wait_for(pending, 10)
        entries = await asyncio.wait_for(stored(running), 10)
        assert [e["method"] for e in entries] == ["/m", "/m", "/lost-connection"]


async def test_checkpoint_and_proofs_from_stored_nodes(start_server, database_url):
    async with start_server() as running:
        log = running.app.audit
        await log.commit([record() for _ in range(13)])
        signed = await log.checkpoint(TENANT)
        pem = await log.public_key_pem(signed.key_id)
        key = serialization.load_pem_public_key(pem.encode())
        assert signed.checkpoint.size == 13 and merkle.verify_checkpoint(signed, key)
        assert await log.checkpoint(TENANT) == signed  # nothing new: reused
        proof = await log.inclusion_proof(TENANT, 6, 0)
        assert merkle.verify_inclusion(proof.leaf_hash, 6, 13, proof.hashes, signed.checkpoint.root)
        await log.commit([record() for _ in range(6)])
        later = await log.consistency_proof(TENANT, 13, 0)
        assert later.second_size == 19
        assert merkle.verify_consistency(13, 19, later.first_root, later.second_root, later.hashes)

        conn = await asyncpg.connect(database_url)
        try:  # rewrite a stored node of the signed tree
            await conn.execute(
                "UPDATE audit_nodes SET hash = $2 WHERE tenant_id = $1 AND level = 4 AND idx = 0",
                TENANT,
                bytes(32),
            )
        finally:
            await conn.close()
        await log.commit([record()])
        with pytest.raises(LogInconsistent):
            await log.checkpoint(TENANT)


async def test_retry_after_a_lost_commit_answer_appends_nothing_twice(
    start_server, database_url, idp
):
    """The connection dies after PostgreSQL committed the batch but before the writer heard
    so: the caller is told AUDIT_UNAVAILABLE, the writer retries, and finds the batch stored."""
    async with (
        LossyProxy(database_url) as proxy,
        start_server(DATABASE_URL=proxy.url, TRUSTPLANE_AUDIT_LINGER="0") as running,
    ):
        member = bearer(idp.token(roles=["member"]))
        events = [pb.AuditEvent(event_type="tool.invoke", resource=f"once-{i}") for i in range(3)]
        await running.audit.AppendEntries(
            pb.AppendEntriesRequest(events=events[:1]), metadata=member
        )
        await running.app.audit.flush()
        proxy.arm()
        status = await expect_error(
            running.audit.AppendEntries(pb.AppendEntriesRequest(events=events), metadata=member)
        )
        assert (status.code, status.reason) == (
            grpc.StatusCode.UNAVAILABLE,
            "AUDIT_UNAVAILABLE",
        )
        assert proxy.cut.is_set()  # PostgreSQL answered the COMMIT; the writer never heard
        await asyncio.wait_for(running.app.audit.flush(), 10)
        entries = await stored(running, TOKEN_TENANT)
        events_stored = [e["resource"] for e in entries if e["kind"] == "event"]
        assert events_stored == ["once-0", "once-0", "once-1", "once-2"]
        assert [e["index"] for e in entries] == list(range(len(entries)))
        assert not [e for e in entries if e["kind"] == "gap"]  # found, not refused as a dup
        registry = running.app.metrics.registry
        assert registry.get_sample_value("trustplane_audit_commit_failures_total") == 1
        assert not registry.get_sample_value("trustplane_audit_rejected_entries_total")
        owner = bearer(idp.token(roles=["owner"]))
        head = await running.audit.GetCheckpoint(pb.GetCheckpointRequest(), metadata=owner)
        lines = []
        async for chunk in running.audit.ExportEntries(pb.ExportEntriesRequest(), metadata=owner):
            lines += chunk.lines
        key = serialization.load_pem_public_key(head.public_key_pem.encode())
        assert verify_export(lines, key).ok


async def test_a_rejected_entry_fails_alone_with_a_gap(start_server, database_url, idp):
    """PostgreSQL refuses one entry (a constraint it breaks): the others of its batch, of the
    same tenant and of another, still commit; its caller gets AUDIT_ENTRY_REJECTED, the log
    records a gap entry and the rejection is counted."""
    await refuse_poison(database_url)
    async with start_server(TRUSTPLANE_AUDIT_LINGER="0", **ONE_IN_FLIGHT) as running:
        log = running.app.audit
        member = bearer(idp.token(roles=["member"]))
        other = bearer(idp.token(roles=["member"], tid=OTHER_TENANT))

        def append(metadata, resource):
            events = [pb.AuditEvent(event_type="tool.invoke", resource=resource)]
            return running.audit.AppendEntries(
                pb.AppendEntriesRequest(events=events), metadata=metadata
            )

        async with stalled(database_url, TOKEN_TENANT) as lock:
            assert log.offer(record(TOKEN_TENANT, "/first"))  # the writer waits with this one
            await writer_waits_on_lock(lock)
            calls = [
                asyncio.ensure_future(append(member, "good")),
                asyncio.ensure_future(append(member, "poison")),
                asyncio.ensure_future(append(other, "elsewhere")),
            ]
            for _ in range(100):  # all three wait in the queue: the next batch holds them all
                if log.depth() == 3:
                    break
                await asyncio.sleep(0.02)
            assert log.depth() == 3
        good, poison, elsewhere = await asyncio.wait_for(
            asyncio.gather(*calls, return_exceptions=True), 20
        )
        assert isinstance(poison, grpc.aio.AioRpcError), poison
        assert good.indexes and elsewhere.indexes
        status = rich(poison)
        assert (status.code, status.reason) == (grpc.StatusCode.INTERNAL, "AUDIT_ENTRY_REJECTED")
        mine = await stored(running, TOKEN_TENANT)
        assert "poison" not in [e["resource"] for e in mine]
        [gap] = [e for e in mine if e["kind"] == "gap"]
        assert gap["reason"] == "AUDIT_ENTRY_REJECTED" and gap["attributes"]["dropped"] == "1"
        assert [
            e["resource"] for e in await stored(running, OTHER_TENANT) if e["kind"] == "event"
        ] == ["elsewhere"]
        rejected = running.app.metrics.registry.get_sample_value(
            "trustplane_audit_rejected_entries_total"
        )
        assert rejected == 1


async def test_a_batch_never_exceeds_256_entries(start_server, database_url, idp):
    """Three appends of 200 events wait together in the queue: the writer commits them in
    batches of at most 256 entries, each request's events together and in order."""
    async with start_server(TRUSTPLANE_AUDIT_LINGER="0", **ONE_IN_FLIGHT) as running:
        log = running.app.audit
        member = bearer(idp.token(roles=["member"]))
        events = [pb.AuditEvent(event_type="tool.invoke")] * 200
        before = running.app.metrics.registry.get_sample_value(
            "trustplane_audit_batch_entries_count"
        )
        async with stalled(database_url, TOKEN_TENANT) as lock:
            assert log.offer(record(TOKEN_TENANT, "/first"))
            await writer_waits_on_lock(lock)
            calls = [
                asyncio.ensure_future(
                    running.audit.AppendEntries(
                        pb.AppendEntriesRequest(events=events), metadata=member
                    )
                )
                for _ in range(3)
            ]
            for _ in range(100):
                if log.depth() == 3:
                    break
                await asyncio.sleep(0.02)
            assert log.depth() == 3
        receipts = await asyncio.wait_for(asyncio.gather(*calls), 20)
        for receipt in receipts:
            first = receipt.indexes[0]
            assert list(receipt.indexes) == list(range(first, first + 200))
        registry = running.app.metrics.registry
        count = registry.get_sample_value("trustplane_audit_batch_entries_count") or 0
        within = registry.get_sample_value("trustplane_audit_batch_entries_bucket", {"le": "256.0"})
        largest = registry.get_sample_value("trustplane_audit_batch_entries_sum")
        assert count - (before or 0) >= 4  # the first entry, then one batch per request
        assert within == count, (within, count, largest)
        status = await expect_error(
            running.audit.AppendEntries(
                pb.AppendEntriesRequest(events=events + events[:57]), metadata=member
            )
        )
        assert (status.code, status.reason) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "REQUEST_TOO_LARGE",
        )


def _settings_update(days: int) -> pb.UpdateSettingsRequest:
    return pb.UpdateSettingsRequest(
        settings=pb.AuditSettings(retention_days=days),
        update_mask=field_mask_pb2.FieldMask(paths=["retention_days"]),
    )


async def _waiting_on_locks(conn: asyncpg.Connection, count: int) -> None:
    for _ in range(200):
        if await conn.fetchval(f"SELECT count(*) FROM pg_stat_activity WHERE {_WAITING}") >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"fewer than {count} trustplane connections wait on a lock")


async def test_a_cancelled_security_call_is_recorded_even_with_a_full_queue(
    start_server, database_url, idp
):
    """A cancelled call cannot wait for room in the queue; its entry is still never lost."""
    async with start_server(
        TRUSTPLANE_AUDIT_QUEUE_SIZE="1", TRUSTPLANE_AUDIT_LINGER="0", **ONE_IN_FLIGHT
    ) as running:
        log = running.app.audit
        admin = bearer(idp.token(roles=["admin"]))
        await running.audit.UpdateSettings(_settings_update(30), metadata=admin)
        await log.flush()
        row_lock = await asyncpg.connect(database_url)
        try:
            async with row_lock.transaction(), stalled(database_url, TOKEN_TENANT) as lock:
                await row_lock.execute(  # UpdateSettings will wait for this row
                    "SELECT 1 FROM audit_settings WHERE tenant_id = $1 FOR UPDATE", TOKEN_TENANT
                )
                assert log.offer(record(TOKEN_TENANT, "/first"))
                await writer_waits_on_lock(lock)
                assert log.offer(record(TOKEN_TENANT, "/fills-the-queue"))
                assert not log.offer(record(TOKEN_TENANT, "/no-room"))
                call = running.audit.UpdateSettings(_settings_update(40), metadata=admin)
                waiting = asyncio.ensure_future(call)
                await _waiting_on_locks(lock, 2)  # the writer and the handler
                call.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await waiting
                for _ in range(100):  # the server sees the cancellation
                    if log.depth() == 2:
                        break
                    await asyncio.sleep(0.02)
                assert log.depth() == 2  # the full queue, and the cancelled call's entry aside
        finally:
            await row_lock.close()
        entries = await asyncio.wait_for(stored(running, TOKEN_TENANT), 10)
        updates = [e for e in entries if e["method"].endswith("/UpdateSettings")]
        assert [(e["code"], e["audit_class"]) for e in updates] == [
            ("OK", "security"),
            ("CANCELLED", "security"),
        ]
        spilled = running.app.metrics.registry.get_sample_value(
            "trustplane_audit_spilled_entries_total"
        )
        assert spilled == 1


async def test_a_security_stream_is_recorded_before_its_first_message(
    start_server, database_url, idp
):
    """ExportSubject (security class, server stream) sends nothing until an entry is durable."""
    async with start_server(TRUSTPLANE_AUDIT_LINGER="0") as running:
        member = bearer(idp.token(roles=["member"]))
        admin = bearer(idp.token(roles=["admin"]))
        event = pb.AuditEvent(
            event_type="crm.lookup", data_subject="ada@example.com", personal_data={"a": "b"}
        )
        await running.audit.AppendEntries(pb.AppendEntriesRequest(events=[event]), metadata=member)
        await running.app.audit.flush()
        request = pb.ExportSubjectRequest(data_subject="ada@example.com")
        async with stalled(database_url, TOKEN_TENANT) as lock:
            stream = running.audit.ExportSubject(request, metadata=admin)
            first = asyncio.ensure_future(stream.read())
            await writer_waits_on_lock(lock)  # the opening entry waits for the log
            await asyncio.sleep(0.3)
            assert not first.done()  # no data before its entry is committed
        message = await asyncio.wait_for(first, 10)
        assert [e.personal_data["a"] for e in message.entries] == ["b"]
        rest = await stream.read()
        assert not isinstance(rest, pb.ExportSubjectResponse)  # the end of the stream (EOF)
        assert await stream.code() == grpc.StatusCode.OK
        entries = await stored(running, TOKEN_TENANT)
        exports = [e for e in entries if e["method"].endswith("/ExportSubject")]
        assert [(e["code"], e["attributes"]["stream"]) for e in exports] == [
            ("OK", "opened"),
            ("OK", "closed"),
        ]
        status = await expect_error(  # fails before any message: one entry, no opening
            running.audit.ExportSubject(pb.ExportSubjectRequest(), metadata=admin).read()
        )
        assert status.code == grpc.StatusCode.INVALID_ARGUMENT
        entries = await stored(running, TOKEN_TENANT)
        exports = [e for e in entries if e["method"].endswith("/ExportSubject")]
        assert [(e["code"], e["attributes"].get("stream")) for e in exports[2:]] == [
            ("INVALID_ARGUMENT", None)
        ]


async def test_nul_characters_are_kept_in_the_body(start_server):
    """PostgreSQL text cannot hold NUL: the filter columns get U+FFFD, the body (which the leaf
    hash covers) keeps the exact value, JSON-escaped."""
    async with start_server(TRUSTPLANE_AUDIT_LINGER="0") as running:
        log = running.app.audit
        nul = Record(
            tenant_id=TENANT,
            kind=CALL,
            time_ms=1,
            method="/m",
            code="OK",
            resource="a\x00b",
            actors=("agent\x00x",),
        )
        [index] = await log.commit([nul])
        found, _ = await log.list_entries(TENANT, EntryFilter(resource="a\x00b"), 10, "")
        assert [e.index for e in found] == [index]
        assert decode(found[0].body)["resource"] == "a\x00b"
        chain, _ = await log.list_entries(TENANT, EntryFilter(agent="agent\x00x"), 10, "")
        assert [e.index for e in chain] == [index]


async def consistent(running, tenant: str = TENANT) -> list[dict[str, Any]]:
    """The log's entries, after checking that every stored leaf hash is its body's, the
    indexes run 0, 1, 2, ... and the root built from the stored nodes (a signed checkpoint) is
    the root of those leaves."""
    await running.app.audit.flush()
    log = running.app.audit
    entries, _ = await log.list_entries(tenant, EntryFilter(), 1000, "")
    assert [e.index for e in entries] == list(range(len(entries)))
    leaves = [merkle.leaf_hash(e.body.encode()) for e in entries if e.body is not None]
    assert [e.leaf_hash for e in entries] == leaves
    signed = await log.checkpoint(tenant)
    assert signed.checkpoint.size == len(entries)
    assert signed.checkpoint.root == merkle.root(leaves)
    return [decode(e.body) for e in entries if e.body is not None]


async def test_pipelined_batches_of_one_log_make_one_consistent_tree(start_server, database_url):
    """With the log's lock held elsewhere, two batches are in flight at once (the second
    hashed against the log as the first will leave it); released, every entry is stored once,
    in order, and the tree is the tree of the stored bodies."""
    async with start_server(TRUSTPLANE_AUDIT_BATCH_MAX="8", TRUSTPLANE_AUDIT_LINGER="0") as running:
        log = running.app.audit
        assert await log.commit([record(method="/warm")]) == [0]  # the writer knows the edge
        async with stalled(database_url) as conn:
            for i in range(40):
                assert log.offer(record(method=f"/m{i}"))
            await _waiting_on_locks(conn, 2)  # two commits in flight, both waiting
        entries = await consistent(running)
        assert [e["method"] for e in entries] == ["/warm", *(f"/m{i}" for i in range(40))]


async def test_a_batch_pipelined_behind_a_refused_one_is_not_hashed_against_it(
    start_server, database_url
):
    """The first of two batches in flight is refused by PostgreSQL; the second, hashed against
    the log as the first would have left it, is not appended at those hashes: it finds the log
    not as expected and is appended where the log really ends."""
    await refuse_poison(database_url)
    async with start_server(TRUSTPLANE_AUDIT_BATCH_MAX="4", TRUSTPLANE_AUDIT_LINGER="0") as running:
        log = running.app.audit
        assert await log.commit([record(method="/warm")]) == [0]
        poisoned = dataclasses.replace(record(method="/bad"), resource="poison")
        async with stalled(database_url) as lock:
            refused = asyncio.ensure_future(log.commit([poisoned, record(method="/with-bad")]))
            await writer_waits_on_lock(lock)
            follows = asyncio.ensure_future(log.commit([record(method="/after")] * 3))
            await _waiting_on_locks(lock, 2)
        assert await asyncio.wait_for(follows, 20)
        with pytest.raises(AuditEntryRejected):
            await asyncio.wait_for(refused, 20)
        entries = await consistent(running)
        methods = [e["method"] for e in entries]
        assert "/bad" not in methods and methods.count("/after") == 3
        assert [e["kind"] for e in entries].count("gap") == 1


async def test_audit_append_refuses_a_log_that_does_not_end_with_the_expected_batch(
    start_server, database_url
):
    """The SQL function itself: the right size is not enough when the entries before it are
    not the batch the caller hashed against; nothing is appended."""
    async with start_server() as running:
        log = running.app.audit
        assert await log.commit([record(), record()]) == [0, 1]
        await log.flush()
        conn = await asyncpg.connect(database_url)
        try:
            stored_batch = await conn.fetchval(
                "SELECT batch FROM audit_entries WHERE tenant_id = $1 AND idx = 0", TENANT
            )
            args = [TENANT, 2, b"\x01" * 16, *([[]] * 14)]
            query = (
                "SELECT outcome, value FROM audit_append("
                + ", ".join(f"${i}" for i in range(1, 20))
                + ")"
            )
            wrong = await conn.fetchrow(query, *args, b"\x02" * 16, 0)
            misplaced = await conn.fetchrow(query, *args, stored_batch, 1)
            assert tuple(wrong) == ("moved", 2) and tuple(misplaced) == ("moved", 2)
            right = await conn.fetchrow(query, *args, stored_batch, 0)
            assert tuple(right) == ("appended", 2)  # an empty batch: only the checks ran
            assert (
                await conn.fetchval(
                    "SELECT count(*) FROM audit_entries WHERE tenant_id = $1", TENANT
                )
                == 2
            )
        finally:
            await conn.close()


async def test_a_read_only_database_is_waited_out_not_taken_for_bad_entries(
    start_server, database_url
):
    """An error that says nothing about the entries (here a read-only standby's, as after a
    failover) is retried until it passes: the caller sees AUDIT_UNAVAILABLE, the entry is
    stored once the database takes writes again, and nothing is rejected or recorded as a gap."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            """
            CREATE TABLE test_read_only (since timestamptz);
            CREATE FUNCTION test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF EXISTS (SELECT 1 FROM test_read_only) THEN
                    RAISE EXCEPTION 'read-only' USING ERRCODE = '25006';
                END IF;
                RETURN NULL;
            END $$;
            CREATE TRIGGER test_refuse BEFORE INSERT ON audit_entries
                FOR EACH STATEMENT EXECUTE FUNCTION test_refuse();
            INSERT INTO test_read_only VALUES (now());
            """
        )
        async with start_server(TRUSTPLANE_AUDIT_LINGER="0") as running:
            log = running.app.audit
            with pytest.raises(AuditUnavailable):
                await asyncio.wait_for(log.commit([record(method="/during-outage")]), 10)
            await conn.execute("DELETE FROM test_read_only")
            entries = await asyncio.wait_for(stored(running), 20)
            assert [e["method"] for e in entries] == ["/during-outage"]
            registry = running.app.metrics.registry
            assert not registry.get_sample_value("trustplane_audit_rejected_entries_total")
            assert registry.get_sample_value("trustplane_audit_commit_failures_total") >= 1
    finally:
        await conn.close()
