"""The grpc.aio bench generator's per-request body: the case's request with a fresh request id
appended as a string field, which protobuf reads as the field's value (the last one wins)."""

from __future__ import annotations

import uuid

from trustplane.session.v1 import session_pb2

from bench.grpcload import to_run, unique_field


def test_an_appended_field_is_the_request_id() -> None:
    template = session_pb2.CreateSessionRequest(
        request_id="00000000-0000-4000-8000-000000000000", role="bench", labels=["a"]
    ).SerializeToString()
    number = session_pb2.CreateSessionRequest.DESCRIPTOR.fields_by_name["request_id"].number
    fresh = str(uuid.uuid4())
    parsed = session_pb2.CreateSessionRequest.FromString(template + unique_field(number, fresh))
    assert (parsed.request_id, parsed.role, list(parsed.labels)) == (fresh, "bench", ["a"])


def test_long_values_and_field_numbers_use_multi_byte_varints() -> None:
    encoded = unique_field(300, "x" * 200)
    assert encoded[:2] == bytes([0xE2, 0x12])  # tag (300 << 3 | 2) as a varint
    assert encoded[2:4] == bytes([0xC8, 0x01]) and encoded[4:] == b"x" * 200


def test_non_ok_statuses_count_as_errors() -> None:
    run = to_run(
        {
            "requests_per_second": 10.0,
            "total": 5,
            "codes": {"OK": 3, "UNAVAILABLE": 2},
            "p50_ms": 1.0,
            "p99_ms": 2.0,
        }
    )
    assert (run.succeeded, run.errored, run.timeout) == (3, 2, 0)
