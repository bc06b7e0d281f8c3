"""The error hierarchy: every expected failure is a `TrustplaneError` that knows its status.

Domain code raises these; it never calls `context.abort`. The status interceptor is the one
place that turns them into a `google.rpc.Status` (AIP-193): the gRPC code, a message for humans,
an `ErrorInfo` whose reason is a value of `trustplane.common.v1.ErrorReason` (for machines), and
`BadRequest` / `RetryInfo` / `QuotaFailure` details where they help. Messages must never carry
internal detail: no SQL, no stack, no secret, no token.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from trustplane.common.v1 import error_reason_pb2

DOMAIN = "trustplane"
_REASON_PREFIX = "ERROR_REASON_"


def reason_name(reason: int) -> str:
    """The wire spelling of a reason: the enum value's name without its prefix."""
    value = error_reason_pb2.ErrorReason.ValueType(reason)
    return error_reason_pb2.ErrorReason.Name(value).removeprefix(_REASON_PREFIX)


@dataclass(frozen=True)
class FieldViolation:
    """One invalid request field: `field` is a path such as `policy.rules[2].condition`."""

    field: str
    description: str


@dataclass(frozen=True)
class QuotaViolation:
    """One exhausted limit, as `google.rpc.QuotaFailure.Violation`."""

    subject: str
    description: str


class TrustplaneError(Exception):
    """Base class of every expected failure; subclasses fix `code` and `reason`."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: int = error_reason_pb2.ERROR_REASON_INTERNAL
    default_message: str = "internal error"

    def __init__(
        self,
        message: str | None = None,
        *,
        reason: int | None = None,
        metadata: Mapping[str, str] | None = None,
        field_violations: Sequence[FieldViolation] = (),
        retry_after: float | None = None,
        quota_violations: Sequence[QuotaViolation] = (),
    ) -> None:
        self.message = message or self.default_message
        super().__init__(self.message)
        if reason is not None:
            self.reason = reason
        self.metadata = dict(metadata or {})
        self.field_violations = tuple(field_violations)
        self.retry_after = retry_after
        self.quota_violations = tuple(quota_violations)

    def with_reason(self, reason: int) -> TrustplaneError:
        """The same error with a more specific reason (returns self, for `raise`)."""
        self.reason = reason
        return self

    def to_status(self) -> grpc.Status:
        """This error as a `grpc.Status` carrying `google.rpc.Status` in its trailers."""
        return rpc_status.to_status(self.to_proto())

    def to_proto(self) -> status_pb2.Status:
        status = status_pb2.Status(code=_CODE_NUMBERS[self.code], message=self.message)
        for detail in self._details():
            status.details.add().Pack(detail)
        return status

    def _details(self) -> list[object]:
        details: list[object] = [
            error_details_pb2.ErrorInfo(
                reason=reason_name(self.reason), domain=DOMAIN, metadata=self.metadata
            )
        ]
        if self.field_violations:
            details.append(_bad_request(self.field_violations))
        if self.retry_after is not None:
            details.append(_retry_info(self.retry_after))
        if self.quota_violations:
            details.append(_quota_failure(self.quota_violations))
        return details


def _bad_request(violations: Sequence[FieldViolation]) -> error_details_pb2.BadRequest:
    return error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in violations
        ]
    )


def _retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    seconds = max(seconds, 0.0)
    whole = math.floor(seconds)
    delay = duration_pb2.Duration(seconds=whole, nanos=int((seconds - whole) * 1e9))
    return error_details_pb2.RetryInfo(retry_delay=delay)


def _quota_failure(violations: Sequence[QuotaViolation]) -> error_details_pb2.QuotaFailure:
    return error_details_pb2.QuotaFailure(
        violations=[
            error_details_pb2.QuotaFailure.Violation(subject=v.subject, description=v.description)
            for v in violations
        ]
    )


_CODE_NUMBERS: dict[grpc.StatusCode, int] = {c: c.value[0] for c in grpc.StatusCode}
assert _CODE_NUMBERS[grpc.StatusCode.NOT_FOUND] == code_pb2.NOT_FOUND


# --- the generic classes, one per status code we use --------------------------------------


class InvalidArgument(TrustplaneError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = error_reason_pb2.ERROR_REASON_INVALID_ARGUMENT
    default_message = "invalid argument"

    @classmethod
    def fields(cls, *violations: FieldViolation, message: str | None = None) -> InvalidArgument:
        """An INVALID_ARGUMENT listing the offending fields."""
        text = message or "; ".join(f"{v.field}: {v.description}" for v in violations)
        return cls(text, field_violations=violations)


class NotFound(TrustplaneError):
    code = grpc.StatusCode.NOT_FOUND
    reason = error_reason_pb2.ERROR_REASON_NOT_FOUND
    default_message = "not found"


class AlreadyExists(TrustplaneError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = error_reason_pb2.ERROR_REASON_ALREADY_EXISTS
    default_message = "already exists"


class FailedPrecondition(TrustplaneError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = error_reason_pb2.ERROR_REASON_FAILED_PRECONDITION
    default_message = "failed precondition"


class Aborted(TrustplaneError):
    code = grpc.StatusCode.ABORTED
    reason = error_reason_pb2.ERROR_REASON_CONFLICT
    default_message = "concurrent modification; retry"


class EtagMismatch(Aborted):
    reason = error_reason_pb2.ERROR_REASON_ETAG_MISMATCH
    default_message = "etag does not match the current resource; re-read and retry"


class Unauthenticated(TrustplaneError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = error_reason_pb2.ERROR_REASON_CREDENTIALS_MISSING
    default_message = "authentication required"


class PermissionDenied(TrustplaneError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = error_reason_pb2.ERROR_REASON_PERMISSION_DENIED
    default_message = "permission denied"


class ResourceExhausted(TrustplaneError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = error_reason_pb2.ERROR_REASON_RATE_LIMITED
    default_message = "rate limit exceeded"


class Unavailable(TrustplaneError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = error_reason_pb2.ERROR_REASON_UNAVAILABLE
    default_message = "service temporarily unavailable; retry with back-off"


class DeadlineExceeded(TrustplaneError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = error_reason_pb2.ERROR_REASON_DEADLINE_EXCEEDED
    default_message = "deadline exceeded"


class Internal(TrustplaneError):
    """The fixed answer to anything unexpected; the cause goes to the log, never the client."""


INTERNAL_ERROR = Internal()


class StoredError(TrustplaneError):
    """An error replayed from a stored `google.rpc.Status` (idempotent replays)."""

    def __init__(self, status: status_pb2.Status) -> None:
        super().__init__(status.message)
        self._status = status
        self.code = _CODES_BY_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN)
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                value = error_reason_pb2.ErrorReason.Value(_REASON_PREFIX + info.reason)
                self.reason = value

    def to_proto(self) -> status_pb2.Status:
        return self._status


_CODES_BY_NUMBER: dict[int, grpc.StatusCode] = {n: c for c, n in _CODE_NUMBERS.items()}


class SecretAlreadyShown(FailedPrecondition):
    """A retry of a call that succeeded and whose response held a one-time secret (a field
    marked `(trustplane.common.v1.secret)`): the secret is never shown twice, so the retry gets
    this instead. Raised by the idempotency layer from its marker, and by the resource's own
    `request_id` path in PostgreSQL when the marker is gone (docs/idempotency.md)."""

    reason = error_reason_pb2.ERROR_REASON_SECRET_ALREADY_SHOWN
    default_message = (
        "a call with this request id already succeeded; its response held a secret that is "
        "shown only once, so it is not repeated. If that response was lost, revoke what it "
        "created and call again with a new request id"
    )
