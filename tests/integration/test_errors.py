"""Error mapping through the real server: code, ErrorInfo reason, details, nothing leaked."""

from __future__ import annotations

import logging

import grpc
import pytest
from tptest.v1 import test_service_pb2

from tests.support.status import expect_error
from tests.support.testing_service import SECRET_IN_EXCEPTION


async def test_invalid_argument_lists_field_violations(server):
    status = await expect_error(
        server.test.Fail(test_service_pb2.FailRequest(kind="invalid_argument", fields=["a", "b.c"]))
    )
    assert status.code is grpc.StatusCode.INVALID_ARGUMENT
    assert (status.reason, status.domain) == ("INVALID_ARGUMENT", "trustplane")
    assert status.field_violations == [
        ("a", "a is not acceptable"),
        ("b.c", "b.c is not acceptable"),
    ]


async def test_not_found_carries_reason_and_metadata(server):
    status = await expect_error(server.test.Fail(test_service_pb2.FailRequest(kind="not_found")))
    assert status.code is grpc.StatusCode.NOT_FOUND
    assert status.reason == "NOT_FOUND"
    assert status.message == "widget not found"
    assert status.metadata == {"resource": "widget"}


async def test_resource_exhausted_carries_retry_info(server):
    status = await expect_error(server.test.Fail(test_service_pb2.FailRequest(kind="exhausted")))
    assert status.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status.reason == "RATE_LIMITED"
    assert status.retry_delay == pytest.approx(1.5)


async def test_unexpected_exception_is_internal_and_leaks_nothing(server, caplog):
    caplog.set_level(logging.ERROR, logger="trustplane.status")
    status = await expect_error(server.test.Fail(test_service_pb2.FailRequest(kind="unexpected")))
    assert status.code is grpc.StatusCode.INTERNAL
    assert status.message == "internal error"
    assert status.reason == "INTERNAL"
    assert "hunter2" not in repr(status)
    # The traceback is logged server-side, for operators.
    errors = [r for r in caplog.records if r.name == "trustplane.status"]
    assert errors and errors[0].exc_info is not None
    assert SECRET_IN_EXCEPTION in str(errors[0].exc_info[1])


async def test_direct_abort_passes_through(server):
    status = await expect_error(server.test.Fail(test_service_pb2.FailRequest(kind="abort")))
    assert status.code is grpc.StatusCode.OUT_OF_RANGE
    assert status.message == "aborted directly"


async def test_streaming_error_after_responses(server):
    call = server.test.StreamEcho(
        test_service_pb2.StreamEchoRequest(message="hi", count=3, fail=True)
    )
    received = []

    async def consume():
        async for response in call:
            received.append(response.index)

    status = await expect_error(consume())
    assert received == [0, 1, 2]
    assert status.code is grpc.StatusCode.NOT_FOUND
    assert status.reason == "NOT_FOUND"


async def test_unknown_method_is_unimplemented(server):
    call = server.channel.unary_unary("/tptest.v1.TestService/Nope")
    status = await expect_error(call(b""))
    assert status.code is grpc.StatusCode.UNIMPLEMENTED
