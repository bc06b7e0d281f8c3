"""Idempotency through the real server, with the Redis and the in-process cache backends."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import grpc.aio
import pytest
from tptest.v1 import test_service_pb2, test_service_pb2_grpc

from tests.support.process import app_process
from tests.support.status import expect_error
from tests.support.tokens import bearer
from tests.support.waiting import eventually


@pytest.fixture(params=["redis", "memory"])
def backend(request):
    return request.param


@pytest.fixture
def start(start_server, backend):
    def start(**env):
        if backend == "memory":
            env["REDIS_URL"] = ""
        return start_server(**env)

    return start


def write(request_id="", name="w", kind="", sleep_millis=0):
    return test_service_pb2.WriteRequest(
        request_id=request_id, name=name, kind=kind, sleep_millis=sleep_millis
    )


async def _replayed(call) -> bool:
    metadata = await call.initial_metadata()
    return dict(metadata or ()).get("idempotency-replayed") == "true"


async def test_concurrent_identical_calls_execute_once(start, idp):
    async with start() as running:
        key, token = str(uuid.uuid4()), bearer(idp.token())
        calls = [
            running.test.Write(write(key, sleep_millis=200), metadata=token) for _ in range(10)
        ]
        responses = await asyncio.gather(*calls)
        assert {r.execution for r in responses} == {1}
        assert running.servicer.calls["write:w"] == 1
        replays = [await _replayed(call) for call in calls]
        assert replays.count(False) == 1 and replays.count(True) == 9


async def test_sequential_retry_replays(start, idp):
    async with start() as running:
        key, token = str(uuid.uuid4()), bearer(idp.token())
        first = running.test.Write(write(key), metadata=token)
        assert (await first).execution == 1 and not await _replayed(first)
        again = running.test.Write(write(key), metadata=token)
        assert (await again).execution == 1 and await _replayed(again)
        fresh = await running.test.Write(write(str(uuid.uuid4())), metadata=token)
        assert fresh.execution == 2


async def test_key_in_metadata_and_case_insensitive(start, idp):
    async with start() as running:
        key = str(uuid.uuid4())
        metadata = (*bearer(idp.token()), ("idempotency-key", key.upper()))
        assert (await running.test.Write(write(), metadata=metadata)).execution == 1
        again = running.test.Write(write(key), metadata=bearer(idp.token()))
        assert (await again).execution == 1 and await _replayed(again)


async def test_different_body_same_key_is_refused(start, idp):
    async with start() as running:
        key, token = str(uuid.uuid4()), bearer(idp.token())
        await running.test.Write(write(key, name="a"), metadata=token)
        status = await expect_error(running.test.Write(write(key, name="b"), metadata=token))
        assert status.code is grpc.StatusCode.FAILED_PRECONDITION
        assert status.reason == "IDEMPOTENCY_KEY_REUSED"
        assert running.servicer.calls.get("write:b") is None


async def test_scope_is_per_method_and_per_principal(start, idp):
    async with start() as running:
        key = str(uuid.uuid4())
        alice, bob = bearer(idp.token(sub="alice")), bearer(idp.token(sub="bob"))
        agent = bearer(idp.token(sub="alice", act={"sub": "agent-1"}))
        assert (await running.test.Write(write(key), metadata=alice)).execution == 1
        assert (await running.test.Create(write(key), metadata=alice)).execution == 2
        assert (await running.test.Write(write(key), metadata=bob)).execution == 3
        assert (await running.test.Write(write(key), metadata=agent)).execution == 4


async def test_transient_error_is_not_stored(start, idp):
    async with start() as running:
        key, token = str(uuid.uuid4()), bearer(idp.token())
        for _ in range(2):
            status = await expect_error(
                running.test.Write(write(key, kind="unavailable"), metadata=token)
            )
            assert status.code is grpc.StatusCode.UNAVAILABLE
        assert running.servicer.calls["write:w"] == 2  # retried for real
        status = await expect_error(
            running.test.Write(write(key, kind="unexpected"), metadata=token)
        )
        assert status.code is grpc.StatusCode.INTERNAL
        assert running.servicer.calls["write:w"] == 3


async def test_deterministic_error_is_replayed(start, idp):
    async with start() as running:
        key, token = str(uuid.uuid4()), bearer(idp.token())
        first = await expect_error(running.test.Write(write(key, kind="not_found"), metadata=token))
        again_call = running.test.Write(write(key, kind="not_found"), metadata=token)
        again = await expect_error(again_call)
        assert (
            (again.code, again.reason, again.message)
            == (first.code, first.reason, first.message)
            == (grpc.StatusCode.NOT_FOUND, "NOT_FOUND", "no such thing")
        )
        assert await _replayed(again_call)
        assert running.servicer.calls["write:w"] == 1


async def test_invalid_missing_and_conflicting_keys(start, idp):
    async with start() as running:
        token = bearer(idp.token())
        status = await expect_error(running.test.Write(write("not-a-uuid"), metadata=token))
        assert (status.code, status.reason) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "IDEMPOTENCY_KEY_INVALID",
        )
        assert status.field_violations[0][0] == "request_id"
        status = await expect_error(running.test.Create(write(), metadata=token))
        assert status.reason == "IDEMPOTENCY_KEY_REQUIRED"
        metadata = (*token, ("idempotency-key", str(uuid.uuid4())))
        status = await expect_error(running.test.Write(write(str(uuid.uuid4())), metadata=metadata))
        assert status.reason == "IDEMPOTENCY_KEY_CONFLICT"
        assert running.servicer.calls.get("Write") is None  # nothing ran
        # OPTIONAL without a key: just runs, every time.
        await running.test.Write(write(), metadata=token)
        assert (await running.test.Write(write(), metadata=token)).execution == 2


async def test_in_flight_duplicate_gets_aborted_then_replays(start, idp):
    async with start(TRUSTPLANE_IDEMPOTENCY_WAIT="0.2") as running:
        key, token = str(uuid.uuid4()), bearer(idp.token())
        first = asyncio.ensure_future(
            running.test.Write(write(key, sleep_millis=1000), metadata=token)
        )
        await eventually(  # the first call holds the key's lease
            lambda: running.servicer.calls.get("Write") == 1, what="the first call is running"
        )
        status = await expect_error(
            running.test.Write(write(key, sleep_millis=1000), metadata=token)
        )
        assert (status.code, status.reason) == (grpc.StatusCode.ABORTED, "IDEMPOTENCY_KEY_IN_USE")
        assert status.retry_delay == pytest.approx(1.0)
        assert (await first).execution == 1
        replay = running.test.Write(write(key, sleep_millis=1000), metadata=token)
        assert (await replay).execution == 1 and await _replayed(replay)


async def test_expired_lease_lets_a_retry_run(start, idp):
    async with start(TRUSTPLANE_IDEMPOTENCY_LEASE="1", TRUSTPLANE_IDEMPOTENCY_WAIT="0") as running:
        key, token = str(uuid.uuid4()), bearer(idp.token())
        stuck = asyncio.ensure_future(
            running.test.Write(write(key, sleep_millis=2500), metadata=token)
        )
        await eventually(  # the lease is taken before the handler runs
            lambda: running.servicer.calls.get("Write") == 1, what="the first call is running"
        )
        await asyncio.sleep(1.3)  # the first call's lease has expired (a crashed process)
        retry = await running.test.Write(write(key, sleep_millis=2500), metadata=token)
        assert retry.execution == 2
        await stuck


async def test_replay_through_a_second_server_process(start_server, idp, make_config):
    """Two server processes sharing PostgreSQL and Redis: a retry may land on either."""
    async with start_server() as running:
        key, token = str(uuid.uuid4()), bearer(idp.token())
        assert (await running.test.Write(write(key), metadata=token)).execution == 1
        async with (
            app_process(running.app.config) as port,
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
        ):
            stub = test_service_pb2_grpc.TestServiceStub(channel)
            replay = stub.Write(write(key), metadata=token)
            assert (await replay).execution == 1
            assert await _replayed(replay)
            fresh = await stub.Write(write(str(uuid.uuid4())), metadata=token)
            assert fresh.execution == 1  # that process's own handler ran
        assert running.servicer.calls["write:w"] == 1
