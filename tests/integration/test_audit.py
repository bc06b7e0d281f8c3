"""AuditService and the audit layer through the real server: every outcome recorded once,
durability of security-class calls, receipts, proofs, queries, isolation, export."""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import time
import uuid

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from google.protobuf import timestamp_pb2
from tptest.v1 import test_service_pb2
from trustplane.audit.v1 import audit_pb2 as pb
from trustplane.audit.v1 import audit_pb2_grpc
from trustplane.crypto.v1 import crypto_pb2

from server.audit import merkle
from server.audit.model import SYSTEM_TENANT, EntryFilter, decode
from server.audit.verify import verify_export
from server.crypto.hierarchy import RootKeys
from tests.support.process import app_process
from tests.support.status import expect_error
from tests.support.tokens import OTHER_TENANT, TENANT, bearer
from tests.support.waiting import eventually

TEST = "/tptest.v1.TestService/"


@pytest.fixture
def member(idp):
    return bearer(idp.token(roles=["member"], sub="user-1"))


async def tenant_entries(running, tenant=TENANT, **filters):
    """Every committed entry of a tenant's log, read past the API (no entry for the read)."""
    await running.app.audit.flush()
    entries, _ = await running.app.audit.list_entries(tenant, EntryFilter(**filters), 1000, "")
    return [decode(e.body) for e in entries]


async def by_method(running, method, tenant=TENANT):
    return await tenant_entries(running, tenant, method=TEST + method)


def event(event_type="tool.invoke", **kw):
    return pb.AuditEvent(event_type=event_type, **kw)


async def append(running, metadata, events, **kw):
    return await running.audit.AppendEntries(
        pb.AppendEntriesRequest(events=events, **kw), metadata=metadata
    )


async def test_each_outcome_is_recorded_exactly_once(server, idp, member):
    token = idp.token(roles=["member"], sub="user-1", sid="sess-1")
    meta = (*bearer(token), ("x-request-id", "req-42"))
    await server.test.WhoAmI(test_service_pb2.WhoAmIRequest(), metadata=meta)
    await expect_error(server.test.WhoAmI(test_service_pb2.WhoAmIRequest()))
    await expect_error(server.test.Administer(test_service_pb2.EchoRequest(), metadata=member))
    write = test_service_pb2.WriteRequest(name="w1", kind="not_found")
    await expect_error(server.test.Write(write, metadata=member))
    await server.test.Echo(test_service_pb2.EchoRequest(message="body-never-stored"))
    await expect_error(server.test.Fail(test_service_pb2.FailRequest(kind="unexpected")))

    [who] = await by_method(server, "WhoAmI")
    assert (who["code"], who["reason"], who["subject"], who["session_id"]) == (
        "OK",
        "",
        "user-1",
        "sess-1",
    )
    assert who["request_id"] == "req-42" and who["kind"] == "call"
    assert who["peer"].startswith("ipv4:127.0.0.1:") and who["latency_us"] >= 0
    assert len(who["request_digest"]) == 64 and who["audit_class"] == "access"
    assert who["subject_type"] == "user" and who["log"] == f"trustplane.audit/{TENANT}"
    [denied] = await by_method(server, "Administer")
    assert (denied["code"], denied["reason"]) == ("PERMISSION_DENIED", "PERMISSION_DENIED")
    [missing] = await by_method(server, "Write")
    assert (missing["code"], missing["reason"], missing["resource"]) == (
        "NOT_FOUND",
        "NOT_FOUND",
        "w1",
    )
    system = await tenant_entries(server, SYSTEM_TENANT)
    unauthenticated = [e for e in system if e["method"] == TEST + "WhoAmI"]
    assert [(e["code"], e["reason"], e["subject"]) for e in unauthenticated] == [
        ("UNAUTHENTICATED", "CREDENTIALS_MISSING", "")
    ]
    assert [e["code"] for e in system if e["method"] == TEST + "Echo"] == ["OK"]
    assert [(e["code"], e["reason"]) for e in system if e["method"] == TEST + "Fail"] == [
        ("INTERNAL", "INTERNAL")
    ]
    every = json.dumps(await tenant_entries(server)) + json.dumps(system)
    assert token not in every and "body-never-stored" not in every


async def test_rejected_token_and_rate_limit_are_recorded(start_server, idp):
    async with start_server(TRUSTPLANE_RATE_LIMIT="1", TRUSTPLANE_RATE_BURST="1") as running:
        expired = bearer(idp.token(exp=1, iat=0))
        status = await expect_error(
            running.test.WhoAmI(test_service_pb2.WhoAmIRequest(), metadata=expired)
        )
        assert status.reason == "TOKEN_EXPIRED"
        member = bearer(idp.token())
        outcomes = []
        for _ in range(3):
            try:
                await running.test.WhoAmI(test_service_pb2.WhoAmIRequest(), metadata=member)
                outcomes.append("OK")
            except grpc.aio.AioRpcError as error:
                outcomes.append(error.code().name)
        assert "RESOURCE_EXHAUSTED" in outcomes
        recorded = await by_method(running, "WhoAmI")
        assert [e["code"] for e in recorded] == outcomes
        assert {e["reason"] for e in recorded if e["code"] != "OK"} == {"RATE_LIMITED"}
        system = await tenant_entries(running, SYSTEM_TENANT, method=TEST + "WhoAmI")
        assert [(e["code"], e["reason"]) for e in system] == [("UNAUTHENTICATED", "TOKEN_EXPIRED")]


async def test_idempotent_replay_is_recorded_with_its_key(server, member):
    key = str(uuid.uuid4())
    request = test_service_pb2.WriteRequest(request_id=key, name="r")
    first = await server.test.Write(request, metadata=member)
    again = await server.test.Write(request, metadata=member)
    assert first.execution == again.execution == 1
    recorded = await by_method(server, "Write")
    assert [(e["idempotency_key"], e["replayed"], e["code"]) for e in recorded] == [
        (key, False, "OK"),
        (key, True, "OK"),
    ]
    assert recorded[0]["request_digest"] == recorded[1]["request_digest"]


async def test_request_digest_covers_the_bytes_as_received(server, member):
    """The digest is over the client's own encoding (fields here in reverse order, which a
    re-serialisation would reorder), keyed by the server's derived key."""
    key = str(uuid.uuid4())
    raw = (
        test_service_pb2.WriteRequest(name="reordered").SerializeToString()
        + test_service_pb2.WriteRequest(request_id=key).SerializeToString()
    )
    parsed = test_service_pb2.WriteRequest.FromString(raw)
    assert parsed.SerializeToString() != raw
    write = server.channel.unary_unary(TEST + "Write")  # bytes in, bytes out
    await write(raw, metadata=member)
    [entry] = await by_method(server, "Write")
    crypto = server.app.config.crypto
    roots = RootKeys.from_config(crypto.root_key, crypto.root_key_file, server.app.config.data_dir)
    digest_key = roots.derive(b"audit-request-digest")
    reserialized = parsed.SerializeToString()
    assert entry["request_digest"] == hmac.digest(digest_key, raw, "sha256").hex()
    assert entry["request_digest"] != hmac.digest(digest_key, reserialized, "sha256").hex()


async def test_security_call_is_committed_before_it_is_answered(server, idp):
    admin = bearer(idp.token(roles=["admin"]))
    request = crypto_pb2.CreateKeyRequest(
        request_id=str(uuid.uuid4()), name="k", purpose=crypto_pb2.KEY_PURPOSE_ENCRYPT_DECRYPT
    )
    await server.crypto.CreateKey(request, metadata=admin)
    body = await server.app.db.fetchval(
        "SELECT body FROM audit_entries WHERE method = $1",
        "/trustplane.crypto.v1.CryptoService/CreateKey",
    )  # no flush: it must already be there
    fields = decode(body)
    assert (fields["audit_class"], fields["code"], fields["resource"]) == ("security", "OK", "k")


async def test_security_call_fails_closed_when_the_log_is_down(server, idp, monkeypatch):
    admin = bearer(idp.token(roles=["admin"]))
    store = server.app.audit._store
    real = store.append

    async def broken(groups, batch):
        raise ConnectionResetError("database gone")

    monkeypatch.setattr(store, "append", broken)
    request = crypto_pb2.CreateKeyRequest(
        request_id=str(uuid.uuid4()), name="k", purpose=crypto_pb2.KEY_PURPOSE_ENCRYPT_DECRYPT
    )
    status = await expect_error(server.crypto.CreateKey(request, metadata=admin))
    assert (status.code, status.reason) == (grpc.StatusCode.UNAVAILABLE, "AUDIT_UNAVAILABLE")
    monkeypatch.setattr(store, "append", real)
    await asyncio.wait_for(server.app.audit.flush(), 10)  # retried, never dropped
    created = await tenant_entries(server, method="/trustplane.crypto.v1.CryptoService/CreateKey")
    assert [e["code"] for e in created] == ["OK"]


async def test_append_receipt_checkpoint_and_proofs(server, idp):
    token = idp.token(roles=["member"], sub="user-1", act={"sub": "agent-7", "ptype": "agent"})
    events = [event(resource=f"tool-{i}", attributes={"n": str(i)}) for i in range(5)]
    receipt = await append(server, bearer(token), events, include_checkpoint=True)
    first = receipt.indexes[0]
    assert list(receipt.indexes) == list(range(first, first + 5))
    checkpoint = receipt.checkpoint
    assert checkpoint.tree_size >= first + 5
    viewer = bearer(idp.token(roles=["viewer"]))
    head = await server.audit.GetCheckpoint(pb.GetCheckpointRequest(), metadata=viewer)
    key = serialization.load_pem_public_key(head.public_key_pem.encode())
    signed = merkle.SignedCheckpoint(
        merkle.Checkpoint.from_body(checkpoint.body), checkpoint.key_id, checkpoint.signature
    )
    assert merkle.verify_checkpoint(signed, key)
    listed = await server.audit.ListEntries(
        pb.ListEntriesRequest(kind=pb.ENTRY_KIND_EVENT), metadata=viewer
    )
    assert [e.index for e in listed.entries] == list(receipt.indexes)
    entry = listed.entries[2]
    assert (entry.subject, list(entry.actors), entry.resource) == ("user-1", ["agent-7"], "tool-2")
    assert entry.event_type == "tool.invoke" and entry.attributes["n"] == "2"
    assert entry.leaf_hash == merkle.leaf_hash(entry.body.encode())
    proof = await server.audit.GetInclusionProof(
        pb.GetInclusionProofRequest(index=entry.index, tree_size=checkpoint.tree_size),
        metadata=viewer,
    )
    assert proof.root_hash == checkpoint.root_hash
    assert merkle.verify_inclusion(
        entry.leaf_hash, entry.index, checkpoint.tree_size, list(proof.hashes), checkpoint.root_hash
    )
    await append(server, bearer(token), [event()])
    later = await server.audit.GetConsistencyProof(
        pb.GetConsistencyProofRequest(first_tree_size=checkpoint.tree_size), metadata=viewer
    )
    assert later.second_tree_size > checkpoint.tree_size
    assert later.first_root_hash == checkpoint.root_hash
    assert merkle.verify_consistency(
        checkpoint.tree_size,
        later.second_tree_size,
        checkpoint.root_hash,
        later.checkpoint.root_hash,
        list(later.hashes),
    )


async def test_append_validation_and_permissions(server, idp, member):
    cases = [
        ([], "INVALID_ARGUMENT", "events"),
        ([event("Bad Type")], "INVALID_ARGUMENT", "events[0].event_type"),
        ([event(code="NOPE")], "INVALID_ARGUMENT", "events[0].code"),
        ([event()] * 257, "REQUEST_TOO_LARGE", "events"),
        ([event(attributes={"a": "x" * 70_000})], "REQUEST_TOO_LARGE", "events[0].attributes"),
    ]
    for events, reason, field in cases:
        status = await expect_error(append(server, member, events))
        assert (status.code, status.reason) == (grpc.StatusCode.INVALID_ARGUMENT, reason)
        assert [f for f, _ in status.field_violations] == [field]
    viewer = bearer(idp.token(roles=["viewer"]))
    status = await expect_error(append(server, viewer, [event()]))
    assert (status.code, status.reason) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
    bad = await expect_error(
        server.audit.GetInclusionProof(pb.GetInclusionProofRequest(index=99), metadata=viewer)
    )
    assert (bad.code, bad.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")


async def test_list_filters_and_page_tokens(server, idp, member):
    events = [event(resource=f"r{i % 2}", session_id=f"s{i % 3}") for i in range(9)]
    await append(server, member, events)
    viewer = bearer(idp.token(roles=["viewer"]))

    async def listed(**kw):
        return await server.audit.ListEntries(pb.ListEntriesRequest(**kw), metadata=viewer)

    assert len((await listed(resource="r0")).entries) == 5
    assert len((await listed(kind=pb.ENTRY_KIND_EVENT, session_id="s1")).entries) == 3
    seen, token = [], ""
    while True:
        page = await listed(kind=pb.ENTRY_KIND_EVENT, page_size=4, page_token=token)
        seen += [e.index for e in page.entries]
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == 9 and seen == sorted(seen)
    first = await listed(kind=pb.ENTRY_KIND_EVENT, page_size=4)
    for tampered in (first.next_page_token[:-2] + "AA", "garbage"):
        status = await expect_error(listed(kind=pb.ENTRY_KIND_EVENT, page_token=tampered))
        assert (status.code, status.reason) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "PAGE_TOKEN_INVALID",
        )
    other_query = await expect_error(listed(resource="r1", page_token=first.next_page_token))
    assert other_query.reason == "PAGE_TOKEN_INVALID"
    assert not (await listed(subject="somebody-else")).entries


async def test_list_filters_time_actor_agent_method_and_code(start_server, idp):
    """Every ListEntries filter through the RPC: time range, actor, agent, method, outcome."""
    now = [time.time() - 600]
    async with start_server(clock=lambda: now[0]) as running:
        user = bearer(idp.token(sub="user-1"))
        delegated = bearer(idp.token(sub="user-1", act={"sub": "agent-7", "ptype": "agent"}))
        chained = bearer(  # agent-8 acting for agent-7 acting for user-1
            idp.token(sub="user-1", act={"sub": "agent-8", "act": {"sub": "agent-7"}})
        )
        own = bearer(idp.token(sub="agent-7", ptype="agent"))
        started = {}
        for name, metadata, code in [
            ("user", user, ""),
            ("delegated", delegated, "NOT_FOUND"),
            ("chained", chained, ""),
            ("own", own, ""),
        ]:
            started[name] = int(now[0] * 1000)
            await append(running, metadata, [event(resource=name, code=code)])
            now[0] += 60
        viewer = bearer(idp.token(roles=["viewer"], sub="viewer-1"))
        await expect_error(append(running, viewer, [event(resource="denied")]))
        await running.audit.GetCheckpoint(pb.GetCheckpointRequest(), metadata=viewer)
        await running.app.audit.flush()

        async def resources(**kw):
            listed = await running.audit.ListEntries(
                pb.ListEntriesRequest(kind=pb.ENTRY_KIND_EVENT, **kw), metadata=viewer
            )
            return [e.resource for e in listed.entries]

        def at(ms):
            return timestamp_pb2.Timestamp(seconds=ms // 1000, nanos=ms % 1000 * 1_000_000)

        middle = {"start_time": at(started["delegated"]), "end_time": at(started["own"])}
        assert await resources(**middle) == ["delegated", "chained"]
        assert await resources(start_time=at(started["chained"])) == ["chained", "own"]
        assert await resources(end_time=at(started["delegated"])) == ["user"]
        assert await resources(actor="agent-7") == ["delegated", "own"]
        assert await resources(actor="agent-8") == ["chained"]
        assert await resources(agent="agent-7") == ["delegated", "chained", "own"]
        assert await resources(agent="agent-8", **middle) == ["chained"]
        assert await resources(agent="user-1") == ["user", "delegated", "chained"]
        assert await resources(code="NOT_FOUND") == ["delegated"]
        assert await resources(code="OK", agent="agent-7") == ["chained", "own"]

        async def calls(**kw):
            listed = await running.audit.ListEntries(
                pb.ListEntriesRequest(kind=pb.ENTRY_KIND_CALL, **kw), metadata=viewer
            )
            return [(e.method.rsplit("/", 1)[1], e.code, e.subject) for e in listed.entries]

        checkpoint = "/trustplane.audit.v1.AuditService/GetCheckpoint"
        assert await calls(method=checkpoint) == [("GetCheckpoint", "OK", "viewer-1")]
        assert await calls(code="PERMISSION_DENIED") == [
            ("AppendEntries", "PERMISSION_DENIED", "viewer-1")
        ]
        appended = await calls(method="/trustplane.audit.v1.AuditService/AppendEntries", code="OK")
        assert len(appended) == 4
        assert await calls(agent="agent-8") == [("AppendEntries", "OK", "user-1")]
        inverted = {"start_time": at(started["own"]), "end_time": at(started["user"])}
        status = await expect_error(
            running.audit.ListEntries(pb.ListEntriesRequest(**inverted), metadata=viewer)
        )
        assert (status.code, status.reason) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
        )


async def test_cross_tenant_queries_see_nothing(server, idp, member):
    """Another tenant's log is at least as large, so every index and size we use exists there
    too: what it gets back is its own log (its leaves, roots, log id), never ours."""
    receipt = await append(server, member, [event(resource="secret-tool")] * 3)
    mine = bearer(idp.token(roles=["owner"]))
    ours = await server.audit.GetCheckpoint(pb.GetCheckpointRequest(), metadata=mine)
    other_member = bearer(idp.token(roles=["member"], tid=OTHER_TENANT))
    await append(server, other_member, [event(resource="theirs")] * (receipt.indexes[-1] + 5))
    other = bearer(idp.token(roles=["owner"], tid=OTHER_TENANT))
    theirs = await server.audit.GetCheckpoint(pb.GetCheckpointRequest(), metadata=other)
    assert theirs.checkpoint.log_id == f"trustplane.audit/{OTHER_TENANT}"
    assert theirs.checkpoint.tree_size >= ours.checkpoint.tree_size
    assert theirs.checkpoint.root_hash != ours.checkpoint.root_hash

    listed = await server.audit.ListEntries(pb.ListEntriesRequest(), metadata=other)
    assert listed.entries and all(e.resource != "secret-tool" for e in listed.entries)
    assert all(TENANT not in e.body for e in listed.entries)
    mine_listed = await server.audit.ListEntries(
        pb.ListEntriesRequest(kind=pb.ENTRY_KIND_EVENT, resource="secret-tool"), metadata=mine
    )
    our_leaves = {e.index: e.leaf_hash for e in mine_listed.entries}

    index, size = receipt.indexes[-1], ours.checkpoint.tree_size
    proof = await server.audit.GetInclusionProof(
        pb.GetInclusionProofRequest(index=index, tree_size=size), metadata=other
    )
    assert proof.leaf_hash != our_leaves[index]  # their leaf at that index
    assert proof.root_hash != ours.checkpoint.root_hash
    assert not merkle.verify_inclusion(
        our_leaves[index], index, size, list(proof.hashes), proof.root_hash
    )
    fresh = await server.audit.GetInclusionProof(
        pb.GetInclusionProofRequest(index=index), metadata=other
    )
    assert fresh.checkpoint.log_id == f"trustplane.audit/{OTHER_TENANT}"
    consistency = await server.audit.GetConsistencyProof(
        pb.GetConsistencyProofRequest(first_tree_size=size), metadata=other
    )
    assert consistency.first_root_hash != ours.checkpoint.root_hash
    assert consistency.checkpoint.log_id == f"trustplane.audit/{OTHER_TENANT}"
    assert not merkle.verify_consistency(
        size,
        consistency.second_tree_size,
        ours.checkpoint.root_hash,
        consistency.second_root_hash,
        list(consistency.hashes),
    )
    pinned = await server.audit.GetConsistencyProof(
        pb.GetConsistencyProofRequest(first_tree_size=1, second_tree_size=size), metadata=other
    )
    assert pinned.second_root_hash != ours.checkpoint.root_hash

    lines = await export(server, other)
    assert all("secret-tool" not in line for line in lines)
    head = json.loads(lines[0])
    assert head["log_id"] == f"trustplane.audit/{OTHER_TENANT}"


async def export(running, metadata, start=0):
    lines = []
    async for chunk in running.audit.ExportEntries(
        pb.ExportEntriesRequest(start_index=start), metadata=metadata
    ):
        lines += chunk.lines
    return lines


async def test_two_server_processes_append_one_consistent_tree(make_config, idp, member):
    """Two OS processes, each with its own writer, append to one tenant's log at once: the
    per-tenant PostgreSQL lock makes them take turns, so the result is one tree."""
    config = make_config()
    async with (  # one after the other: the first creates the root key both use
        app_process(config, TRUSTPLANE_RATE_LIMIT="0") as first,
        app_process(config, TRUSTPLANE_RATE_LIMIT="0") as second,
        grpc.aio.insecure_channel(f"127.0.0.1:{first}") as one,
        grpc.aio.insecure_channel(f"127.0.0.1:{second}") as two,
    ):
        stubs = [audit_pb2_grpc.AuditServiceStub(c) for c in (one, two)]
        calls = [
            stub.AppendEntries(
                pb.AppendEntriesRequest(events=[event(resource=f"{n}-{i}") for i in range(20)]),
                metadata=member,
            )
            for n, stub in enumerate(stubs * 10)
        ]
        receipts = await asyncio.gather(*calls)
        indexes = sorted(i for r in receipts for i in r.indexes)
        assert len(indexes) == len(set(indexes)) == 400
        for r in receipts:  # each batch is contiguous: one writer per log at a time
            assert list(r.indexes) == list(range(r.indexes[0], r.indexes[0] + 20))
        owner = bearer(idp.token(roles=["owner"]))
        lines: list[str] = []
        async for chunk in stubs[0].ExportEntries(pb.ExportEntriesRequest(), metadata=owner):
            lines += chunk.lines
        head = await stubs[1].GetCheckpoint(pb.GetCheckpointRequest(), metadata=owner)
        key = serialization.load_pem_public_key(head.public_key_pem.encode())
        report = verify_export(lines, key)
        assert report.ok, report.problems
        assert report.entries == json.loads(lines[0])["size"] >= 400
        later = await stubs[1].GetConsistencyProof(
            pb.GetConsistencyProofRequest(first_tree_size=report.entries), metadata=owner
        )
        first_root = report.checkpoint.checkpoint.root
        assert merkle.verify_consistency(
            report.entries,
            later.second_tree_size,
            first_root,
            later.second_root_hash,
            list(later.hashes),
        )


async def public_key(running, metadata):
    head = await running.audit.GetCheckpoint(pb.GetCheckpointRequest(), metadata=metadata)
    return serialization.load_pem_public_key(head.public_key_pem.encode())


async def test_retention_keeps_proofs_valid(start_server, idp, member):
    now = [time.time() - 400 * 86_400]
    async with start_server(clock=lambda: now[0]) as running:
        old = await append(running, member, [event(resource="old")] * 4)
        now[0] = time.time()
        new = await append(running, member, [event(resource="new")] * 2)
        now[0] = time.time() - 400 * 86_400  # a process whose clock lags appends after them
        late = await append(running, member, [event(resource="late")] * 2)
        now[0] = time.time()
        await running.app.audit.flush()
        await running.app.audit.expire()
        owner = bearer(idp.token(roles=["owner"]))
        listed = await running.audit.ListEntries(
            pb.ListEntriesRequest(kind=pb.ENTRY_KIND_EVENT), metadata=owner
        )
        redacted = [e.index for e in listed.entries if not e.body]
        # Only the start of the log: the late entries keep their bodies until all before
        # them have expired, so bodiless entries stay a prefix.
        assert redacted == list(old.indexes)
        assert late.indexes[0] > new.indexes[-1]
        assert all(len(e.leaf_hash) == 32 for e in listed.entries)
        lines = await export(running, owner)
        report = verify_export(lines, await public_key(running, owner))
        assert report.ok, report.problems
        # The old events and the old AppendEntries call's own entry.
        assert (report.expired, report.first_retained) == (5, new.indexes[0])
        await running.app.audit.expire()  # again: nothing more (starts after the prefix)
        again = await running.audit.ListEntries(
            pb.ListEntriesRequest(kind=pb.ENTRY_KIND_EVENT), metadata=owner
        )
        assert [e.index for e in again.entries if not e.body] == list(old.indexes)
        proof = await running.audit.GetInclusionProof(
            pb.GetInclusionProofRequest(index=old.indexes[0]), metadata=owner
        )
        assert merkle.verify_inclusion(
            proof.leaf_hash,
            proof.index,
            proof.tree_size,
            list(proof.hashes),
            proof.checkpoint.root_hash,
        )


async def read_until(stream, lines, wanted=lambda lines: True):
    """Read a followed export into `lines` until `wanted(lines)` holds and every entry below
    the latest checkpoint has arrived; returns that checkpoint's size."""
    while True:
        message = await asyncio.wait_for(stream.read(), 10)
        assert isinstance(message, pb.ExportEntriesResponse), message
        lines += message.lines
        parsed = [json.loads(line) for line in lines]
        heads = [p for p in parsed if p["type"] == "checkpoint"]
        have = {p["index"] for p in parsed if p["type"] == "entry"}
        size = heads[-1]["size"]
        if wanted(lines) and have >= set(range(heads[0]["start_index"], size)):
            return size


def resources_in(lines, resource):
    bodies = [json.loads(line).get("body") or "{}" for line in lines]
    return sum(1 for body in bodies if json.loads(body).get("resource") == resource)


async def test_follow_tails_new_entries_with_proofs(start_server, make_config, idp, member):
    """ExportEntries(follow): the snapshot, then every growth of the log — appended here or
    by another server process — as a checkpoint proven to extend the last one and the new
    entries with their proofs; it verifies as one export. A cancelled tail is recorded."""
    config = make_config(TRUSTPLANE_AUDIT_TAIL_INTERVAL="0.1")
    async with start_server(config) as one, start_server(config) as two:
        owner = bearer(idp.token(roles=["owner"]))
        await append(one, member, [event(resource="before")])
        stream = one.audit.ExportEntries(pb.ExportEntriesRequest(follow=True), metadata=owner)
        lines: list[str] = []
        first = await read_until(stream, lines)
        assert resources_in(lines, "before") == 1
        await append(one, member, [event(resource="local")] * 2)
        await read_until(stream, lines, lambda got: resources_in(got, "local") == 2)
        await append(two, member, [event(resource="remote")] * 3)  # polled for
        size = await read_until(stream, lines, lambda got: resources_in(got, "remote") == 3)
        heads = [json.loads(line) for line in lines if '"type":"checkpoint"' in line]
        assert len(heads) >= 3 and heads[0]["complete"] and size > first
        assert all(h["start_index"] == p["size"] for p, h in itertools.pairwise(heads))
        report = verify_export(lines, await public_key(one, owner))
        assert report.ok, report.problems
        assert report.checkpoint.checkpoint.size == size == report.entries
        tampered = [line.replace("remote", "REMOTE") for line in lines]
        assert not verify_export(tampered, await public_key(one, owner)).ok
        stream.cancel()
        await one.app.audit.flush()
        method = "/trustplane.audit.v1.AuditService/ExportEntries"
        await eventually(
            lambda: tenant_entries(one, method=method), what="the cancelled export's entry"
        )
        assert [e["code"] for e in await tenant_entries(one, method=method)] == ["CANCELLED"]

        tail = two.audit.ExportEntries(pb.ExportEntriesRequest(follow=True), metadata=owner)
        await read_until(tail, [])
        started = time.monotonic()
        await two.app.stop()  # the grace period is 5 s: the tail must not hold it
        assert time.monotonic() - started < 3
        assert not isinstance(await tail.read(), pb.ExportEntriesResponse)  # ended (EOF)
        assert await tail.code() == grpc.StatusCode.OK


async def test_retention_runs_every_configured_interval(start_server, idp, member):
    """TRUSTPLANE_AUDIT_RETENTION_INTERVAL: the background job removes expired bodies by
    itself (nobody calls expire)."""
    now = [time.time() - 400 * 86_400]
    async with start_server(
        clock=lambda: now[0], TRUSTPLANE_AUDIT_RETENTION_INTERVAL="0.2"
    ) as running:
        old = await append(running, member, [event(resource="old")] * 3)
        now[0] = time.time()
        await append(running, member, [event(resource="new")])
        viewer = bearer(idp.token(roles=["viewer"]))

        async def redacted() -> list[int]:
            listed = await running.audit.ListEntries(
                pb.ListEntriesRequest(kind=pb.ENTRY_KIND_EVENT), metadata=viewer
            )
            return [e.index for e in listed.entries if not e.body]

        assert await eventually(redacted, what="retention redacts") == list(old.indexes)


async def test_a_checkpoint_is_signed_every_interval(start_server, idp, member):
    """TRUSTPLANE_AUDIT_CHECKPOINT_INTERVAL: the periodic job signs a checkpoint of every log
    that grew, without anybody asking for one (and none while nothing changes)."""
    async with start_server(
        TRUSTPLANE_AUDIT_CHECKPOINT_INTERVAL="0.2", TRUSTPLANE_AUDIT_CHECKPOINT_ENTRIES="0"
    ) as running:

        async def signed_sizes():
            rows = await running.app.db.pool.fetch(
                "SELECT size FROM audit_checkpoints WHERE tenant_id = $1 ORDER BY size", TENANT
            )
            return [r["size"] for r in rows]

        async def signed_at_least(size):
            async def grown():
                sizes = await signed_sizes()
                return sizes if sizes and sizes[-1] >= size else None

            return await eventually(grown, what=f"a checkpoint of {size} entries signed")

        first = await append(running, member, [event()] * 3)
        sizes = await signed_at_least(first.indexes[-1] + 1)
        await running.app.audit.flush()
        grown = await running.app.db.pool.fetchval(
            "SELECT size FROM audit_logs WHERE tenant_id = $1", TENANT
        )
        settled = await signed_at_least(grown)
        await asyncio.sleep(0.6)  # three periods without growth: nothing new
        assert await signed_sizes() == settled
        second = await append(running, member, [event()] * 2)
        later = await signed_at_least(second.indexes[-1] + 1)
        assert len(later) > len(sizes)
        row = await running.app.db.pool.fetchrow(
            "SELECT size, root, timestamp_ms, key_id, signature FROM audit_checkpoints"
            " WHERE tenant_id = $1 ORDER BY size DESC LIMIT 1",
            TENANT,
        )
        signed = merkle.SignedCheckpoint(
            merkle.Checkpoint(
                f"trustplane.audit/{TENANT}", row["size"], bytes(row["root"]), row["timestamp_ms"]
            ),
            row["key_id"],
            bytes(row["signature"]),
        )
        owner = bearer(idp.token(roles=["owner"]))
        assert merkle.verify_checkpoint(signed, await public_key(running, owner))
