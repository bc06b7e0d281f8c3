"""Audit log through the real server: personal data under per-subject keys (erase and export a
subject), per-tenant retention settings, the client-streaming append, and drop mode with gap
entries."""

from __future__ import annotations

import asyncio
import base64
import time

import asyncpg
import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from google.protobuf import field_mask_pb2
from tptest.v1 import test_service_pb2
from trustplane.audit.v1 import audit_pb2 as pb

from server.audit.model import EntryFilter, decode
from server.audit.subjects import key_name, key_tenant
from server.audit.verify import verify_export
from server.crypto.service import KeyVersionDestroyed
from tests.support.status import RichStatus, expect_error
from tests.support.tokens import OTHER_TENANT, TENANT, bearer

EMAIL = "ada@example.com"


@pytest.fixture
def member(idp):
    return bearer(idp.token(roles=["member"], sub="agent-7"))


@pytest.fixture
def admin(idp):
    return bearer(idp.token(roles=["admin"], sub="admin-1"))


def personal_event(subject=EMAIL, **personal):
    return pb.AuditEvent(
        event_type="crm.lookup",
        resource="customers",
        data_subject=subject,
        personal_data=personal or {"email": subject, "phone": "+44 20 7946 0000"},
    )


async def fails(
    awaitable: object, code: grpc.StatusCode, *, reason: str = "", field: str = ""
) -> RichStatus:
    status = await expect_error(awaitable)
    assert status.code == code, status
    if reason:
        assert status.reason == reason, status
    if field:
        assert field in [f for f, _ in status.field_violations], status
    return status


async def export_subject(running, metadata, subject=EMAIL):
    entries = []
    async for chunk in running.audit.ExportSubject(
        pb.ExportSubjectRequest(data_subject=subject), metadata=metadata
    ):
        entries += chunk.entries
    return entries


async def verify_log(running, metadata):
    lines = []
    async for chunk in running.audit.ExportEntries(pb.ExportEntriesRequest(), metadata=metadata):
        lines += chunk.lines
    head = await running.audit.GetCheckpoint(pb.GetCheckpointRequest(), metadata=metadata)
    report = verify_export(lines, serialization.load_pem_public_key(head.public_key_pem.encode()))
    assert report.ok, report.problems
    return report


async def test_personal_data_is_stored_encrypted_and_exported_decrypted(server, member, admin):
    receipt = await server.audit.AppendEntries(
        pb.AppendEntriesRequest(events=[personal_event(), personal_event()]), metadata=member
    )
    other = await server.audit.AppendEntries(
        pb.AppendEntriesRequest(events=[personal_event("bob@example.com", note="x")]),
        metadata=member,
    )
    listed = await server.audit.ListEntries(
        pb.ListEntriesRequest(kind=pb.ENTRY_KIND_EVENT), metadata=admin
    )
    bodies = [e.body for e in listed.entries]
    assert all("example.com" not in b and "7946" not in b for b in bodies)
    refs = {e.index: e.data_subject_ref for e in listed.entries}
    assert refs[receipt.indexes[0]] == refs[receipt.indexes[1]] != refs[other.indexes[0]]
    assert all(len(ref) == 32 for ref in refs.values())
    assert decode(bodies[0])["personal"]["subject"] == refs[receipt.indexes[0]]

    exported = await export_subject(server, admin)
    assert [e.entry.index for e in exported] == list(receipt.indexes)
    assert all(
        dict(e.personal_data) == {"email": EMAIL, "phone": "+44 20 7946 0000"} for e in exported
    )
    assert not any(e.personal_data_erased for e in exported)
    await verify_log(server, admin)


async def test_export_subject_includes_the_principals_own_calls(server, member, admin):
    await server.test.WhoAmI(test_service_pb2.WhoAmIRequest(), metadata=member)
    await server.app.audit.flush()
    exported = await export_subject(server, admin, "agent-7")
    assert any(e.entry.method.endswith("/WhoAmI") for e in exported)
    assert all(e.entry.subject == "agent-7" or "agent-7" in e.entry.actors for e in exported)


async def test_erase_subject_shreds_its_key_and_the_log_still_verifies(server, member, admin):
    first = await server.audit.AppendEntries(
        pb.AppendEntriesRequest(events=[personal_event()] * 3), metadata=member
    )
    await server.audit.AppendEntries(
        pb.AppendEntriesRequest(events=[personal_event("bob@example.com")]), metadata=member
    )
    before = await server.audit.ListEntries(pb.ListEntriesRequest(), metadata=admin)
    ref = next(e.data_subject_ref for e in before.entries if e.index == first.indexes[0])

    erased = await server.audit.EraseSubject(
        pb.EraseSubjectRequest(data_subject=EMAIL), metadata=admin
    )
    assert erased.entries == 3 and erased.erase_time.seconds > 0

    # The entries keep their place and ciphertext; the key that opens them is gone.
    after = await server.audit.ListEntries(pb.ListEntriesRequest(), metadata=admin)
    same = {e.index: e.body for e in before.entries}
    assert all(same[e.index] == e.body for e in after.entries if e.index in same)
    target = next(e for e in after.entries if e.index == first.indexes[0])
    sealed = base64.b64decode(decode(target.body)["personal"]["ciphertext"])
    with pytest.raises(KeyVersionDestroyed):
        await server.app.crypto.decrypt(key_tenant(TENANT), key_name(ref), sealed, b"")
    exported = await export_subject(server, admin)
    assert exported == []  # nothing links the subject to its old entries any more
    await verify_log(server, admin)

    # Bob is untouched; new data about Ada gets a new key and is readable.
    assert len(await export_subject(server, admin, "bob@example.com")) == 1
    again = await server.audit.AppendEntries(
        pb.AppendEntriesRequest(events=[personal_event(city="London")]), metadata=member
    )
    [fresh] = await export_subject(server, admin)
    assert fresh.entry.index == again.indexes[0] and dict(fresh.personal_data) == {"city": "London"}
    assert fresh.entry.data_subject_ref != ref

    # Erasing again (or a subject never seen) changes nothing.
    assert (
        await server.audit.EraseSubject(
            pb.EraseSubjectRequest(data_subject="nobody@example.com"), metadata=admin
        )
    ).entries == 0


async def test_subject_rpcs_need_admin_and_validate(server, member, admin):
    await fails(
        server.audit.EraseSubject(pb.EraseSubjectRequest(data_subject=EMAIL), metadata=member),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    await fails(export_subject(server, member), grpc.StatusCode.PERMISSION_DENIED)
    await fails(
        server.audit.EraseSubject(pb.EraseSubjectRequest(data_subject=""), metadata=admin),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="data_subject",
    )
    bad = pb.AuditEvent(event_type="x", personal_data={"email": EMAIL})
    await fails(
        server.audit.AppendEntries(pb.AppendEntriesRequest(events=[bad]), metadata=member),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="events[0].data_subject",
    )


async def test_subjects_are_per_tenant(server, idp, member, admin):
    await server.audit.AppendEntries(
        pb.AppendEntriesRequest(events=[personal_event()]), metadata=member
    )
    other_admin = bearer(idp.token(roles=["admin"], tid=OTHER_TENANT))
    assert await export_subject(server, other_admin) == []
    erased = await server.audit.EraseSubject(
        pb.EraseSubjectRequest(data_subject=EMAIL), metadata=other_admin
    )
    assert erased.entries == 0
    assert len(await export_subject(server, admin)) == 1


async def test_retention_is_per_tenant(start_server, idp):
    now = [time.time() - 100 * 86_400]
    async with start_server(clock=lambda: now[0]) as running:
        mine = bearer(idp.token(roles=["admin"]))
        theirs = bearer(idp.token(roles=["admin"], tid=OTHER_TENANT))
        settings = await running.audit.GetSettings(pb.GetSettingsRequest(), metadata=mine)
        assert settings.settings.retention_days == 365

        mask = field_mask_pb2.FieldMask(paths=["retention_days"])
        updated = await running.audit.UpdateSettings(
            pb.UpdateSettingsRequest(
                settings=pb.AuditSettings(retention_days=30, etag=settings.settings.etag),
                update_mask=mask,
            ),
            metadata=mine,
        )
        assert updated.settings.retention_days == 30
        assert updated.settings.etag != settings.settings.etag
        await fails(
            running.audit.UpdateSettings(
                pb.UpdateSettingsRequest(
                    settings=pb.AuditSettings(retention_days=60, etag=settings.settings.etag),
                    update_mask=mask,
                ),
                metadata=mine,
            ),
            grpc.StatusCode.ABORTED,
            reason="ETAG_MISMATCH",
        )
        for days, field in ((0, "settings.retention_days"), (5000, "settings.retention_days")):
            await fails(
                running.audit.UpdateSettings(
                    pb.UpdateSettingsRequest(
                        settings=pb.AuditSettings(retention_days=days), update_mask=mask
                    ),
                    metadata=mine,
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
                field=field,
            )
        await fails(
            running.audit.UpdateSettings(
                pb.UpdateSettingsRequest(settings=pb.AuditSettings(retention_days=9)),
                metadata=mine,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            field="update_mask",
        )
        member = bearer(idp.token(roles=["member"]))
        await fails(
            running.audit.UpdateSettings(
                pb.UpdateSettingsRequest(
                    settings=pb.AuditSettings(retention_days=1), update_mask=mask
                ),
                metadata=member,
            ),
            grpc.StatusCode.PERMISSION_DENIED,
        )

        event = pb.AuditEvent(event_type="tool.invoke", resource="old")
        for metadata in (mine, theirs):
            await running.audit.AppendEntries(
                pb.AppendEntriesRequest(events=[event]), metadata=metadata
            )
        now[0] = time.time()  # 100 days later: past 30 days, within 365
        await running.app.audit.flush()
        await running.app.audit.expire()
        audit = running.app.audit
        kept = await audit.list_entries(OTHER_TENANT, EntryFilter(resource="old"), 10, "")
        assert len(kept[0]) == 1 and kept[0][0].body is not None
        mine_entries, _ = await audit.list_entries(TENANT, EntryFilter(kind="event"), 10, "")
        assert [e.body for e in mine_entries] == [None]
        await verify_log(running, mine)


async def requests(*batches, include_checkpoint=False):
    for i, events in enumerate(batches):
        yield pb.StreamAppendEntriesRequest(
            events=events, include_checkpoint=include_checkpoint and i == 0
        )
        await asyncio.sleep(0)


async def test_stream_append_commits_in_order_with_a_receipt(server, member, admin):
    batches = [
        [pb.AuditEvent(event_type="tool.invoke", resource=f"r{i}-{j}") for j in range(5)]
        for i in range(20)
    ]
    response = await server.audit.StreamAppendEntries(
        requests(*batches, include_checkpoint=True), metadata=member
    )
    assert len(response.indexes) == 100
    assert list(response.indexes) == sorted(response.indexes)
    assert response.checkpoint.tree_size >= response.indexes[-1] + 1
    listed = await server.audit.ListEntries(
        pb.ListEntriesRequest(kind=pb.ENTRY_KIND_EVENT, page_size=1000), metadata=admin
    )
    order = [e.resource for e in listed.entries]
    assert order == [f"r{i}-{j}" for i in range(20) for j in range(5)]
    assert all(e.subject == "agent-7" for e in listed.entries)


async def test_stream_append_stops_at_a_bad_message(server, member, admin):
    good = [pb.AuditEvent(event_type="tool.invoke", resource="good")]
    bad = [pb.AuditEvent(event_type="Not Valid")]
    late = [pb.AuditEvent(event_type="tool.invoke", resource="late")]
    await fails(
        server.audit.StreamAppendEntries(requests(good, good, bad, late), metadata=member),
        grpc.StatusCode.INVALID_ARGUMENT,
        field="messages[2].events[0].event_type",
    )
    listed = await server.audit.ListEntries(
        pb.ListEntriesRequest(kind=pb.ENTRY_KIND_EVENT), metadata=admin
    )
    assert [e.resource for e in listed.entries] == ["good", "good"]
    await fails(
        server.audit.StreamAppendEntries(requests(), metadata=member),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


async def test_drop_mode_leaves_a_gap_entry(start_server, idp, database_url):
    async with start_server(
        TRUSTPLANE_AUDIT_OVERFLOW="drop", TRUSTPLANE_AUDIT_QUEUE_SIZE="2"
    ) as running:
        member = bearer(idp.token(roles=["member"]))
        await running.test.WhoAmI(test_service_pb2.WhoAmIRequest(), metadata=member)
        await running.app.audit.flush()
        # Stall the writer on this tenant's log lock, so the queue fills up.
        blocker = await asyncpg.connect(database_url)
        try:
            await blocker.execute("SELECT pg_advisory_lock($1, hashtext($2))", 0x61756474, TENANT)
            calls = 30
            for _ in range(calls):  # every call is answered although its entry may be dropped
                await asyncio.wait_for(
                    running.test.WhoAmI(test_service_pb2.WhoAmIRequest(), metadata=member), 5
                )
            await blocker.execute("SELECT pg_advisory_unlock($1, hashtext($2))", 0x61756474, TENANT)
        finally:
            await blocker.close()
        await running.app.audit.flush()
        await asyncio.sleep(0.2)
        await running.app.audit.flush()
        whoami = await running.app.audit.list_entries(
            TENANT, EntryFilter(method="/tptest.v1.TestService/WhoAmI"), 1000, ""
        )
        gaps = await running.app.audit.list_entries(TENANT, EntryFilter(kind="gap"), 1000, "")
        dropped = sum(int(decode(g.body)["attributes"]["dropped"]) for g in gaps[0])
        assert dropped >= 1
        assert len(whoami[0]) - 1 + dropped == calls
        gap = decode(gaps[0][0].body)
        assert gap["reason"] == "AUDIT_QUEUE_FULL" and gap["kind"] == "gap"
        assert int(gap["attributes"]["first_dropped_ms"]) <= int(
            gap["attributes"]["last_dropped_ms"]
        )
        admin = bearer(idp.token(roles=["admin"]))
        listed = await running.audit.ListEntries(
            pb.ListEntriesRequest(kind=pb.ENTRY_KIND_GAP), metadata=admin
        )
        assert len(listed.entries) == len(gaps[0]) and listed.entries[0].kind == pb.ENTRY_KIND_GAP
        metrics = running.app.metrics.registry.get_sample_value(
            "trustplane_audit_dropped_entries_total"
        )
        assert metrics == dropped
        await verify_log(running, admin)


async def test_a_checkpoint_is_signed_every_n_entries(start_server, idp):
    async with start_server(
        TRUSTPLANE_AUDIT_CHECKPOINT_ENTRIES="10", TRUSTPLANE_AUDIT_CHECKPOINT_INTERVAL="86400"
    ) as running:
        member = bearer(idp.token(roles=["member"]))
        events = [pb.AuditEvent(event_type="tool.invoke")] * 12
        await running.audit.AppendEntries(pb.AppendEntriesRequest(events=events), metadata=member)
        for _ in range(50):
            signed = await running.app.audit._store.latest_checkpoint(TENANT)
            if signed is not None:
                break
            await asyncio.sleep(0.05)
        assert signed is not None and signed.checkpoint.size >= 10
