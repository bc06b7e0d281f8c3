"""Prometheus metrics on their own port: calls by method and code, latency, pool gauges."""

from __future__ import annotations

import asyncio
import urllib.request

from tptest.v1 import test_service_pb2

from tests.support.status import expect_error


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


async def test_calls_counted_by_method_and_code(server):
    for _ in range(3):
        await server.test.Echo(test_service_pb2.EchoRequest(message="m"))
    await expect_error(server.test.Fail(test_service_pb2.FailRequest(kind="not_found")))
    samples = await asyncio.to_thread(_scrape, server.app.metrics_port)
    echo = '{code="OK",method="/tptest.v1.TestService/Echo"}'
    fail = '{code="NOT_FOUND",method="/tptest.v1.TestService/Fail"}'
    assert samples[f"trustplane_rpc_calls_total{echo}"] == 3
    assert samples[f"trustplane_rpc_calls_total{fail}"] == 1
    count = 'trustplane_rpc_duration_seconds_count{method="/tptest.v1.TestService/Echo"}'
    assert samples[count] == 3
    assert samples["trustplane_database_up"] == 1
    assert samples['trustplane_db_pool_connections{kind="max"}'] == 4
