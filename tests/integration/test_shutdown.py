"""Graceful shutdown: health goes NOT_SERVING, in-flight calls finish, new ones are refused."""

from __future__ import annotations

import asyncio

import grpc
from tptest.v1 import test_service_pb2

from tests.support.status import expect_error
from tests.support.waiting import eventually


async def test_in_flight_call_completes_during_shutdown(start_server):
    async with start_server(TRUSTPLANE_GRACE_PERIOD="5") as running:
        in_flight = asyncio.ensure_future(
            running.test.Sleep(test_service_pb2.SleepRequest(millis=700))
        )
        await eventually(
            lambda: running.servicer.calls.get("Sleep") == 1, what="the call reached the handler"
        )
        stopping = asyncio.ensure_future(running.app.stop())
        response = await in_flight
        assert response.slept_millis == 700
        await stopping


async def test_calls_beyond_grace_period_are_cut(start_server):
    async with start_server(TRUSTPLANE_GRACE_PERIOD="0.2") as running:
        in_flight = asyncio.ensure_future(
            running.test.Sleep(test_service_pb2.SleepRequest(millis=5000))
        )
        await eventually(
            lambda: running.servicer.calls.get("Sleep") == 1, what="the call reached the handler"
        )
        await running.app.stop()
        status = await expect_error(in_flight)
        assert status.code in {grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE}


async def test_new_calls_refused_after_shutdown(start_server):
    async with start_server() as running:
        await running.app.stop()
        status = await expect_error(
            running.test.Echo(test_service_pb2.EchoRequest(message="x"), timeout=2)
        )
        assert status.code in {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
