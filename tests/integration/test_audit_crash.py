"""kill -9 of a real server process under load loses no entry whose call a client saw succeed:
appended events (receipts) and security-class calls are committed before they are answered."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid

import asyncpg
import grpc
import grpc.aio
from cryptography.hazmat.primitives import serialization
from trustplane.audit.v1 import audit_pb2, audit_pb2_grpc
from trustplane.crypto.v1 import crypto_pb2, crypto_pb2_grpc

from server.audit.model import decode
from server.audit.verify import verify_export
from tests.support.process import ServerProcess, server_env
from tests.support.services import free_port
from tests.support.tokens import TENANT, bearer


async def _appender(channel, metadata, acked, stop):
    stub = audit_pb2_grpc.AuditServiceStub(channel)
    while not stop.is_set():
        resource = uuid.uuid4().hex
        events = [audit_pb2.AuditEvent(event_type="tool.invoke", resource=resource)] * 5
        try:
            receipt = await stub.AppendEntries(
                audit_pb2.AppendEntriesRequest(events=events), metadata=metadata, timeout=5
            )
        except grpc.aio.AioRpcError:
            return
        acked.extend((index, resource) for index in receipt.indexes)


async def _creator(channel, metadata, acked, stop):
    stub = crypto_pb2_grpc.CryptoServiceStub(channel)
    while not stop.is_set():
        name = f"k{uuid.uuid4().hex[:16]}"
        request = crypto_pb2.CreateKeyRequest(
            request_id=str(uuid.uuid4()), name=name, purpose=crypto_pb2.KEY_PURPOSE_MAC
        )
        try:
            await stub.CreateKey(request, metadata=metadata, timeout=5)
        except grpc.aio.AioRpcError:
            return
        acked.append(name)


async def test_kill_9_loses_no_acknowledged_entry(
    tmp_path, database_url, redis_url, redis_prefix, idp, start_server
):
    port = free_port()
    env = server_env(
        TRUSTPLANE_LISTEN=f"127.0.0.1:{port}",
        TRUSTPLANE_METRICS_LISTEN="off",
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        TRUSTPLANE_CACHE_PREFIX=redis_prefix,
        TRUSTPLANE_TRUSTED_ISSUERS_FILE=str(idp.issuers_file),
        TRUSTPLANE_RATE_LIMIT="0",
        TRUSTPLANE_DATA_DIR=str(tmp_path / "data"),
    )
    server = ServerProcess([], env, cwd=tmp_path)
    events: list[tuple[int, str]] = []
    keys: list[str] = []
    try:
        await asyncio.to_thread(server.wait_serving, f"127.0.0.1:{port}")
        metadata = bearer(idp.token(roles=["admin"]))
        stop = asyncio.Event()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            workers = [_appender(channel, metadata, events, stop) for _ in range(6)]
            workers += [_creator(channel, metadata, keys, stop) for _ in range(3)]
            tasks = [asyncio.ensure_future(w) for w in workers]
            await asyncio.sleep(1.5)
            os.killpg(server.proc.pid, signal.SIGKILL)
            stop.set()
            await asyncio.gather(*tasks)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
        server.output()  # collects (and closes) its pipes
    assert events and keys
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT idx, body FROM audit_entries WHERE tenant_id = $1", TENANT)
    finally:
        await conn.close()
    bodies = {r["idx"]: decode(r["body"]) for r in rows}
    for index, resource in events:
        assert bodies[index]["resource"] == resource, index
    created = {
        b["resource"]
        for b in bodies.values()
        if b["method"].endswith("/CreateKey") and b["code"] == "OK"
    }
    assert set(keys) <= created
    async with start_server(TRUSTPLANE_DATA_DIR=str(tmp_path / "data")) as running:
        owner = bearer(idp.token(roles=["owner"]))
        stub = running.audit
        head = await stub.GetCheckpoint(audit_pb2.GetCheckpointRequest(), metadata=owner)
        lines = []
        async for chunk in stub.ExportEntries(audit_pb2.ExportEntriesRequest(), metadata=owner):
            lines += chunk.lines
        key = serialization.load_pem_public_key(head.public_key_pem.encode())
        report = verify_export(lines, key)
        assert report.ok, report.problems[:5]
