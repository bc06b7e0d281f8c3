"""Layer 7 (innermost): retries are safe (AIP-155; semantics in docs/idempotency.md).

A unary method that declares idempotency OPTIONAL or REQUIRED takes its key from the request's
`request_id` field or the `idempotency-key` metadata (both set and different: INVALID_ARGUMENT
IDEMPOTENCY_KEY_CONFLICT). The key must be a UUID. Its scope is (tenant, principal, actor,
method, key) — never the key alone — and the request's fingerprint is the SHA-256 of the
method and the deterministic serialization of the request with `request_id` cleared.

In the cache, one entry per scope holds either a *lease* (the first call is running) or the
*outcome*. The first call claims the lease atomically (set-if-absent) and, when it finishes,
swaps it for its outcome (compare-and-set) — an OK response or a deterministic error
(INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION, OUT_OF_RANGE) — kept for
TRUSTPLANE_IDEMPOTENCY_TTL (24 h). Any other outcome releases the lease so a retry runs for
real. A response carrying a one-time secret (a field marked `(trustplane.common.v1.secret)`:
API keys, invitation tokens, TOTP secrets, recovery codes) is never stored: its outcome is kept
as FAILED_PRECONDITION / SECRET_ALREADY_SHOWN, so the secret never sits in the cache and a
retry learns that the first call succeeded without seeing the secret twice. A duplicate that
finds an outcome replays it, with `idempotency-replayed: true` in the response's initial
metadata; one that finds a lease waits (bounded by its deadline and
TRUSTPLANE_IDEMPOTENCY_WAIT) for the outcome, else fails ABORTED IDEMPOTENCY_KEY_IN_USE with
RetryInfo; one whose fingerprint differs fails FAILED_PRECONDITION IDEMPOTENCY_KEY_REUSED. A
lease whose process died expires after TRUSTPLANE_IDEMPOTENCY_LEASE.

It runs after authentication and authorization, so a replay is re-authorized and a guessed
key can never read another principal's response. Streaming methods pass untouched.

Failure mode: if the cache is unreachable the call runs without deduplication (and
`trustplane_idempotency_unavailable_total` counts it). Creation stays exactly-once because every
resource created by a mutating RPC stores its `request_id` under a unique constraint in the same
transaction (ARCHITECTURE §4), so a retry finds the existing resource.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import prometheus_client as prom
from google.rpc import status_pb2
from trustplane.common.v1 import error_reason_pb2 as reasons

from interceptors.chain import Call, Context
from server import call_state
from server.actor import ActorContext
from server.cache import Cache, CacheUnavailable
from server.config import IdempotencyConfig
from server.errors import (
    Aborted,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    SecretAlreadyShown,
    StoredError,
    TrustplaneError,
)
from server.methods import Idempotency, MethodSpec

_log = logging.getLogger("trustplane.idempotency")
METADATA_KEY = "idempotency-key"
REPLAYED_KEY = "idempotency-replayed"
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
STORED_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)


@dataclass(frozen=True)
class Record:
    """A cache entry: a running call's lease, or a finished call's outcome."""

    done: bool
    fingerprint: str
    owner: str = ""
    code: int = 0  # 0: `body` is the response; otherwise a serialized google.rpc.Status
    body: bytes = b""

    def encode(self) -> bytes:
        return json.dumps(
            {
                "d": self.done,
                "f": self.fingerprint,
                "o": self.owner,
                "c": self.code,
                "b": base64.b64encode(self.body).decode(),
            }
        ).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Record:
        data = json.loads(raw)
        return cls(data["d"], data["f"], data["o"], data["c"], base64.b64decode(data["b"]))


class IdempotencyLayer:
    """See the module docstring."""

    def __init__(
        self,
        cache: Cache,
        config: IdempotencyConfig,
        registry: prom.CollectorRegistry,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._cache = cache
        self._config = config
        self._clock = clock
        self._sleep = sleep
        self._replays = prom.Counter(
            "trustplane_idempotent_replays", "Replayed outcomes.", ["method"], registry=registry
        )
        self._unavailable = prom.Counter(
            "trustplane_idempotency_unavailable",
            "Calls run undeduplicated: cache down.",
            registry=registry,
        )

    def wrap(self, method: MethodSpec, call: Call) -> Call:
        if not method.unary or method.idempotency is Idempotency.NONE:
            return call
        run = self._run

        async def idempotent(request: Any, context: Context) -> Any:
            state = call_state.current()
            key = request_key(request, method, state.metadata)
            if key is None:
                return await call(request, context)
            state.idempotency_key = key
            return await run(method, call, request, context)

        return idempotent

    async def _run(self, method: MethodSpec, call: Call, request: Any, context: Context) -> Any:
        state = call_state.current()
        scope = scope_key(state.require_actor(), method, state.idempotency_key)
        lease = Record(False, fingerprint(method, request), owner=uuid.uuid4().hex)
        try:
            existing = await self._claim_or_wait(scope, lease, context)
        except CacheUnavailable:
            self._unavailable.inc()
            _log.warning("idempotency cache unavailable; running without deduplication")
            return await call(request, context)
        if existing is None:
            return await self._execute(method, scope, lease, request, context, call)
        return await self._replay(method, existing, context)

    async def _claim_or_wait(self, scope: str, lease: Record, context: Context) -> Record | None:
        """None when we hold the lease; else the finished outcome to replay."""
        remaining = context.time_remaining()
        wait = self._config.max_wait if remaining is None else min(remaining, self._config.max_wait)
        deadline, pause = self._clock() + wait, 0.01
        while True:
            if await self._cache.set_if_absent(scope, lease.encode(), self._config.lease):
                return None
            raw = await self._cache.get(scope)
            if raw is not None:
                found = Record.decode(raw)
                if found.fingerprint != lease.fingerprint:
                    raise FailedPrecondition(
                        "this request id was already used with a different request",
                        reason=reasons.ERROR_REASON_IDEMPOTENCY_KEY_REUSED,
                    )
                if found.done:
                    return found
            if self._clock() >= deadline:
                raise Aborted(
                    "a call with this request id is still running; retry shortly",
                    reason=reasons.ERROR_REASON_IDEMPOTENCY_KEY_IN_USE,
                    retry_after=1.0,
                )
            await self._sleep(pause)
            pause = min(pause * 2, 0.1)

    async def _execute(
        self,
        method: MethodSpec,
        scope: str,
        lease: Record,
        request: Any,
        context: Context,
        call: Call,
    ) -> Any:
        try:
            response = await call(request, context)
        except TrustplaneError as exc:
            if exc.code in STORED_CODES:
                body = exc.to_proto().SerializeToString()
                await self._finish(scope, lease, exc.code.value[0], body)
            else:
                await self._release(scope, lease)
            raise
        except BaseException:
            await self._release(scope, lease)
            raise
        if method.secret_response:
            # A one-time secret is never kept, not even in the cache: the outcome recorded is
            # "this succeeded; its secret was shown", which a retry gets instead of the secret.
            shown = SecretAlreadyShown(
                metadata={"request_id": call_state.current().idempotency_key}
            )
            marker = shown.to_proto().SerializeToString()
            await self._finish(scope, lease, grpc.StatusCode.FAILED_PRECONDITION.value[0], marker)
        else:
            await self._finish(scope, lease, 0, response.SerializeToString())
        return response

    async def _finish(self, scope: str, lease: Record, code: int, body: bytes) -> None:
        outcome = Record(True, lease.fingerprint, lease.owner, code, body)
        try:
            if not await self._cache.compare_and_set(
                scope, lease.encode(), outcome.encode(), self._config.ttl
            ):
                _log.warning("idempotency lease expired before the call finished")
        except CacheUnavailable:
            _log.warning("idempotency outcome not stored: cache unavailable")

    async def _release(self, scope: str, lease: Record) -> None:
        try:
            await self._cache.compare_and_delete(scope, lease.encode())
        except CacheUnavailable:
            _log.warning("idempotency lease not released: cache unavailable (it expires)")

    async def _replay(self, method: MethodSpec, record: Record, context: Context) -> Any:
        call_state.current().replayed = True
        self._replays.labels(method.path).inc()
        await context.send_initial_metadata(((REPLAYED_KEY, "true"),))
        if record.code:
            raise StoredError(status_pb2.Status.FromString(record.body))
        assert method.response_type is not None
        return method.response_type.FromString(record.body)


def request_key(request: Any, method: MethodSpec, metadata: dict[str, str]) -> str | None:
    """The validated, normalised key; None when the call carries none and may omit it."""
    field = request.request_id if method.has_request_id else ""
    header = metadata.get(METADATA_KEY, "")
    if field and header and field.lower() != header.lower():
        raise InvalidArgument.fields(
            FieldViolation("request_id", f"differs from the {METADATA_KEY} metadata"),
        ).with_reason(reasons.ERROR_REASON_IDEMPOTENCY_KEY_CONFLICT)
    raw = (field or header).lower()
    if not raw:
        if method.idempotency is Idempotency.REQUIRED:
            raise InvalidArgument.fields(
                FieldViolation("request_id", "required: a UUID identifying this request"),
            ).with_reason(reasons.ERROR_REASON_IDEMPOTENCY_KEY_REQUIRED)
        return None
    if not _UUID.match(raw):
        name = "request_id" if field else METADATA_KEY
        raise InvalidArgument.fields(
            FieldViolation(name, "must be a UUID such as 123e4567-e89b-12d3-a456-426614174000"),
        ).with_reason(reasons.ERROR_REASON_IDEMPOTENCY_KEY_INVALID)
    return raw


def scope_key(actor: ActorContext, method: MethodSpec, key: str) -> str:
    parts = (actor.tenant_id, actor.subject, actor.actor_id, method.path, key)
    return "idem:" + hashlib.sha256("\0".join(parts).encode()).hexdigest()


def fingerprint(method: MethodSpec, request: Any) -> str:
    if method.has_request_id and request.request_id:
        clone = type(request)()
        clone.CopyFrom(request)
        clone.request_id = ""
        request = clone
    body = request.SerializeToString(deterministic=True)
    return hashlib.sha256(method.path.encode() + b"\0" + body).hexdigest()
