"""`python -m bench.grpcload`: a grpc.aio load generator for what h2load cannot send.

h2load repeats one pre-encoded body, so every CreateSession it sends after the first carries the
same request id and is an idempotent replay. This generator sends a different body per request:
the case's serialized request with a fresh UUID appended as string field `--unique-field`
(protobuf keeps the last value of a repeated scalar field, so the appended one is the request
id). The bench runs it in a process of its own, pinned to the load CPU, against the case's
method and, in the same run with the same body generation, against the echo server: the ratio
compares two servers under one client, like for like.

Output (stdout, one JSON object): requests/s, counts by gRPC status code, p50 and p99 latency.
Every status is seen (unlike h2load, which only sees HTTP statuses); the bench still checks the
server's own counters too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

from bench.h2load import LoadShape, Run, percentile

_CALL_TIMEOUT = 30.0
_READY_TIMEOUT = 10.0


def unique_field(number: int, value: str) -> bytes:
    """The wire encoding of string field `number` holding `value` (tag, length, bytes)."""
    return _varint(number << 3 | 2) + _varint(len(value.encode())) + value.encode()


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


@dataclass
class _Tally:
    remaining: int
    latencies_us: list[int]
    codes: Counter[str]


async def drive(
    address: str,
    path: str,
    headers: Sequence[tuple[str, str]],
    template: bytes,
    field: int,
    shape: LoadShape,
) -> dict[str, Any]:
    """Send `shape.requests` calls over `shape.clients` channels with `shape.streams` in flight
    on each; every body is `template` plus a fresh UUID in string field `field`."""
    channels = [grpc.aio.insecure_channel(address) for _ in range(shape.clients)]
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), _READY_TIMEOUT)
        calls = [channel.unary_unary(path, None, None) for channel in channels]  # raw bytes
        tally = _Tally(shape.requests, [], Counter())
        started = time.perf_counter()
        await asyncio.gather(
            *(
                _worker(calls[i % shape.clients], headers, template, field, tally)
                for i in range(shape.in_flight)
            )
        )
        elapsed = time.perf_counter() - started
    finally:
        for channel in channels:
            await channel.close(None)
    ordered = sorted(tally.latencies_us)
    done = sum(tally.codes.values())
    return {
        "requests_per_second": done / elapsed if elapsed > 0 else 0.0,
        "total": shape.requests,
        "codes": dict(tally.codes),
        "p50_ms": percentile(ordered, 50) / 1000,
        "p99_ms": percentile(ordered, 99) / 1000,
    }


async def _worker(
    call: Any, headers: Sequence[tuple[str, str]], template: bytes, field: int, tally: _Tally
) -> None:
    metadata = tuple(headers)
    while tally.remaining > 0:
        tally.remaining -= 1
        body = template + unique_field(field, str(uuid.uuid4()))
        started = time.perf_counter()
        try:
            await call(body, metadata=metadata, timeout=_CALL_TIMEOUT)
            code = "OK"
        except grpc.aio.AioRpcError as error:
            code = error.code().name
        tally.latencies_us.append(int((time.perf_counter() - started) * 1_000_000))
        tally.codes[code] += 1


def to_run(result: dict[str, Any]) -> Run:
    """The generator's JSON as the bench's `Run` (non-OK statuses count as errored)."""
    codes: dict[str, int] = result["codes"]
    ok = codes.get("OK", 0)
    return Run(
        requests_per_second=float(result["requests_per_second"]),
        total=int(result["total"]),
        succeeded=ok,
        failed=0,
        errored=sum(codes.values()) - ok,
        timeout=int(result["total"]) - sum(codes.values()),
        p50_ms=float(result["p50_ms"]),
        p99_ms=float(result["p99_ms"]),
    )


def command(
    address: str,
    path: str,
    headers: Sequence[tuple[str, str]],
    template: bytes,
    field: int,
    shape: LoadShape,
) -> list[str]:
    """The argument list of one generator run (without the CPU pinning prefix)."""
    args = [sys.executable, "-m", "bench.grpcload", "--address", address, "--path", path]
    args += ["--template", template.hex(), "--unique-field", str(field)]
    args += ["--requests", str(shape.requests), "--clients", str(shape.clients)]
    args += ["--streams", str(shape.streams)]
    for name, value in headers:
        args += ["--header", f"{name}: {value}"]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.grpcload", description=__doc__)
    parser.add_argument("--address", required=True, help="host:port (plaintext)")
    parser.add_argument("--path", required=True, help="/package.Service/Method")
    parser.add_argument("--template", required=True, help="the serialized request, hex")
    parser.add_argument("--unique-field", type=int, required=True, help="string field number")
    parser.add_argument("--requests", type=int, required=True)
    parser.add_argument("--clients", type=int, default=4, help="channels")
    parser.add_argument("--streams", type=int, default=8, help="calls in flight per channel")
    parser.add_argument("--header", action="append", default=[], help='"name: value"')
    args = parser.parse_args(argv)
    headers = [tuple(part.strip() for part in h.split(":", 1)) for h in args.header]
    shape = LoadShape(args.requests, args.clients, args.streams)
    result = asyncio.run(
        drive(
            args.address,
            args.path,
            [(name, value) for name, value in headers],
            bytes.fromhex(args.template),
            args.unique_field,
            shape,
        )
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
