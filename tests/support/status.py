"""Read the rich status (AIP-193 details) out of a failed call, as any client would."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from google.rpc import error_details_pb2, status_pb2

_DETAILS_KEY = "grpc-status-details-bin"


@dataclass
class RichStatus:
    code: grpc.StatusCode
    message: str
    reason: str = ""
    domain: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    field_violations: list[tuple[str, str]] = field(default_factory=list)
    retry_delay: float | None = None
    quota_subjects: list[str] = field(default_factory=list)


def rich(error: grpc.aio.AioRpcError) -> RichStatus:
    result = RichStatus(code=error.code(), message=error.details() or "")
    trailers: Any = error.trailing_metadata() or ()
    for key, value in trailers:
        if key == _DETAILS_KEY:
            _fill(result, status_pb2.Status.FromString(value))
    return result


def _fill(result: RichStatus, status: status_pb2.Status) -> None:
    assert status.code == result.code.value[0], "status proto and gRPC code disagree"
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        bad = error_details_pb2.BadRequest()
        retry = error_details_pb2.RetryInfo()
        quota = error_details_pb2.QuotaFailure()
        if detail.Unpack(info):
            result.reason, result.domain = info.reason, info.domain
            result.metadata = dict(info.metadata)
        elif detail.Unpack(bad):
            result.field_violations = [(v.field, v.description) for v in bad.field_violations]
        elif detail.Unpack(retry):
            result.retry_delay = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
        elif detail.Unpack(quota):
            result.quota_subjects = [v.subject for v in quota.violations]


async def expect_error(awaitable: object) -> RichStatus:
    """Await a call that must fail; return its rich status."""
    try:
        await awaitable  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        return rich(error)
    raise AssertionError("the call succeeded but was expected to fail")
