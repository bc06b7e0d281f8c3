"""Conversions between protobuf well-known types and the plain values domain code uses."""

from __future__ import annotations

from typing import Any

from google.protobuf import timestamp_pb2

from server.errors import FieldViolation, InvalidArgument


def timestamp(value: float | None) -> timestamp_pb2.Timestamp | None:
    """Epoch seconds as a Timestamp (None stays unset)."""
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(value * 1e9))
    return stamp


def seconds(message: Any, field: str) -> float | None:
    """A Timestamp or Duration field as seconds; None when the field is unset."""
    if not message.HasField(field):
        return None
    return float(getattr(message, field).ToNanoseconds() / 1e9)


def etag(tag: str, revision: int) -> str:
    """An entity tag (AIP-154): a short stable prefix and the resource's revision."""
    return f'"{tag}-{revision}"'


def revision(value: str, field: str = "etag") -> int | None:
    """The revision an etag from `etag` carries; None for an empty one (no precondition)."""
    if not value:
        return None
    try:
        return int(value.strip('"').rsplit("-", 1)[1])
    except (IndexError, ValueError):
        raise InvalidArgument.fields(FieldViolation(field, "malformed etag")) from None
