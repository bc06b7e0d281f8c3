"""Health and reflection through the real server, and health following PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from server.embedded import EmbeddedPostgres
from tests.support.status import expect_error

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_health_serving_overall_and_unknown_service(server):
    response = await server.health.Check(health_pb2.HealthCheckRequest(service=""))
    assert response.status == SERVING
    status = await expect_error(server.health.Check(health_pb2.HealthCheckRequest(service="nope")))
    assert status.code is grpc.StatusCode.NOT_FOUND


async def test_health_per_registered_service(server):
    response = await server.health.Check(
        health_pb2.HealthCheckRequest(service="tptest.v1.TestService")
    )
    assert response.status == SERVING


async def test_reflection_lists_services(server):
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = [r async for r in stub.ServerReflectionInfo(iter([request]))]
    names = {s.name for s in responses[0].list_services_response.service}
    assert {
        "grpc.health.v1.Health",
        "tptest.v1.TestService",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names


@pytest.mark.slow
async def test_health_follows_postgres_down_and_up(start_server, tmp_path):
    """A dedicated embedded PostgreSQL, stopped and restarted under a running server."""
    embedded = EmbeddedPostgres(tmp_path / "pg")
    dsn = await asyncio.to_thread(embedded.start)
    try:
        async with start_server(DATABASE_URL=dsn) as running:
            watch = running.health.Watch(health_pb2.HealthCheckRequest(service=""))
            seen = _Collector(watch)
            await seen.wait_for(SERVING)
            await asyncio.to_thread(embedded.stop)
            await seen.wait_for(NOT_SERVING)
            check = await running.health.Check(health_pb2.HealthCheckRequest(service=""))
            assert check.status == NOT_SERVING
            await asyncio.to_thread(embedded.start)
            await seen.wait_for(SERVING)
            assert seen.statuses == [SERVING, NOT_SERVING, SERVING]
            watch.cancel()
    finally:
        await asyncio.to_thread(embedded.stop)


class _Collector:
    def __init__(self, call: Any) -> None:
        self.statuses: list[int] = []
        self._call = call

    async def wait_for(self, status: int, timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while not self.statuses or self.statuses[-1] != status:
                response: Any = await self._call.read()
                self.statuses.append(response.status)


async def test_health_watch_is_public_stream(server):
    stub = health_pb2_grpc.HealthStub(server.channel)
    call = stub.Watch(health_pb2.HealthCheckRequest(service="tptest.v1.TestService"))
    first = await call.read()
    assert first.status == SERVING
    call.cancel()
