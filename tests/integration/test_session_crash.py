"""A CreateSession whose server dies between the commit and the answer: the client's retry,
on another server, returns the session the first call created, never a second one."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import grpc
import grpc.aio
from trustplane.session.v1 import session_pb2 as pb
from trustplane.session.v1 import session_pb2_grpc

from tests.support.process import app_port, app_process_env, spawn_app
from tests.support.tokens import bearer


async def _retry(stub, request, metadata):
    """Retry as a client would while the dead process's idempotency lease runs out."""
    for _ in range(50):
        try:
            return (await stub.CreateSession(request, metadata=metadata)).session
        except grpc.aio.AioRpcError as error:
            if error.code() is not grpc.StatusCode.ABORTED:
                raise
            await asyncio.sleep(0.2)
    raise AssertionError("still ABORTED after 10 s")


async def test_retry_after_a_crash_between_commit_and_answer(make_config, start_server, idp):
    config = make_config(TRUSTPLANE_IDEMPOTENCY_LEASE="1")
    env = app_process_env(config, TRUSTPLANE_IDEMPOTENCY_LEASE="1")
    doomed = spawn_app(env, "tests.support.crash_after_commit")
    metadata = bearer(idp.token(sub="agent-1", ptype="agent"))
    request = pb.CreateSessionRequest(request_id=str(uuid.uuid4()), role="coder")
    try:
        port = await app_port(doomed)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = session_pb2_grpc.SessionServiceStub(channel)
            try:
                await stub.CreateSession(request, metadata=metadata, timeout=10)
            except grpc.aio.AioRpcError as error:
                assert error.code() is grpc.StatusCode.UNAVAILABLE
            else:
                raise AssertionError("the first call was answered")
        assert await asyncio.to_thread(doomed.wait, 30) == 137
    finally:
        if doomed.poll() is None:
            doomed.kill()
            doomed.wait(30)
        doomed.stdout.close()
    conn = await asyncpg.connect(config.database.url)
    try:
        rows = await conn.fetch(
            "SELECT id FROM agent_sessions WHERE request_id = $1", request.request_id
        )
        assert len(rows) == 1  # committed, although nobody was told
        async with start_server(config) as running:
            stub = session_pb2_grpc.SessionServiceStub(running.channel)
            session = await _retry(stub, request, metadata)
            assert session.session_id == str(rows[0]["id"]) and session.role == "coder"
            again = await _retry(stub, request, metadata)
            assert again == session
        count = "SELECT count(*) FROM agent_sessions"
        assert await conn.fetchval(count) == 1
    finally:
        await conn.close()
