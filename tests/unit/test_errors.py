"""The error hierarchy and its conversion to google.rpc.Status."""

from __future__ import annotations

from typing import Any

import grpc
from google.rpc import error_details_pb2
from trustplane.common.v1 import error_reason_pb2

from server import errors


def _details(error: errors.TrustplaneError) -> list[Any]:
    out: list[Any] = []
    for any_ in error.to_proto().details:
        for cls in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.RetryInfo,
            error_details_pb2.QuotaFailure,
        ):
            message = cls()
            if any_.Unpack(message):
                out.append(message)
    return out


def test_every_class_reason_exists_in_the_contract():
    def walk(cls):
        yield cls
        for sub in cls.__subclasses__():
            yield from walk(sub)

    names = set(error_reason_pb2.ErrorReason.keys())
    for cls in walk(errors.TrustplaneError):
        assert error_reason_pb2.ErrorReason.Name(cls.reason) in names
        assert cls.reason != error_reason_pb2.ERROR_REASON_UNSPECIFIED


def test_reason_wire_name_drops_prefix():
    assert errors.reason_name(error_reason_pb2.ERROR_REASON_TOKEN_EXPIRED) == "TOKEN_EXPIRED"


def test_status_carries_code_message_and_error_info():
    error = errors.NotFound("session not found", metadata={"session_id": "s1"})
    status = error.to_status()
    assert status.code is grpc.StatusCode.NOT_FOUND
    assert status.details == "session not found"
    (info,) = _details(error)
    assert info.reason == "NOT_FOUND" and info.domain == "trustplane"
    assert dict(info.metadata) == {"session_id": "s1"}


def test_field_violations_retry_and_quota():
    error = errors.ResourceExhausted(
        reason=error_reason_pb2.ERROR_REASON_QUOTA_EXCEEDED,
        retry_after=2.25,
        quota_violations=[errors.QuotaViolation("tenant:t1", "shell.exec per hour")],
    )
    info, retry, quota = _details(error)
    assert info.reason == "QUOTA_EXCEEDED"
    assert (retry.retry_delay.seconds, retry.retry_delay.nanos) == (2, 250_000_000)
    assert quota.violations[0].subject == "tenant:t1"
    bad = errors.InvalidArgument.fields(errors.FieldViolation("name", "required"))
    assert bad.message == "name: required"
    assert _details(bad)[1].field_violations[0].field == "name"


def test_internal_has_fixed_message():
    assert errors.INTERNAL_ERROR.to_status().details == "internal error"
    assert errors.INTERNAL_ERROR.to_status().code is grpc.StatusCode.INTERNAL
