"""Layer 1 (outermost): create the call state, time the call, count it by final status code.

It runs first so that every call is counted, including ones the inner layers reject, and so
that one `CallState` exists for all of them. Failed calls are logged (method, code, reason,
request id, latency — never the request); successful ones only at DEBUG, to keep the hot path
free of I/O.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import grpc
import grpc.aio

from interceptors.chain import Call, Context
from server import call_state
from server.methods import MethodSpec
from server.metrics import Metrics

_log = logging.getLogger("trustplane.access")
_REQUEST_ID_KEYS = ("x-request-id", "x-trace-id")


class ObserveLayer:
    """Metrics and the access log; see the module docstring."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def wrap(self, method: MethodSpec, call: Call) -> Call:
        ok = self._metrics.calls.labels(method.path, "OK")
        latency = self._metrics.latency.labels(method.path)
        record_failure = self._record_failure

        async def observed(request: Any, context: Context) -> Any:
            state = call_state.CallState(method=method, started=time.perf_counter())
            state.metadata = _metadata(context)
            state.request_id = _request_id(state.metadata)
            token = call_state.bind(state)
            try:
                response = await call(request, context)
            except grpc.aio.AbortError:
                _settle_abort(state, context)
                raise
            except asyncio.CancelledError:
                state.code = grpc.StatusCode.CANCELLED
                raise
            finally:
                latency.observe(time.perf_counter() - state.started)
                call_state.unbind(token)
                if state.code is not grpc.StatusCode.OK:
                    record_failure(state)
            ok.inc()
            return response

        return observed

    def _record_failure(self, state: call_state.CallState) -> None:
        code = state.code.name
        self._metrics.calls.labels(state.method.path, code).inc()
        _log.info(
            "call failed",
            extra={
                "method": state.method.path,
                "code": code,
                "reason": state.reason,
                "request_id": state.request_id,
                "latency_ms": round((time.perf_counter() - state.started) * 1000, 3),
            },
        )


def _metadata(context: Context) -> dict[str, str]:
    pairs = context.invocation_metadata() or ()
    return {k: v for k, v in pairs if isinstance(v, str)}


def _request_id(metadata: dict[str, str]) -> str:
    for key in _REQUEST_ID_KEYS:
        value = metadata.get(key)
        if value:
            return value[:128]
    return ""


def _settle_abort(state: call_state.CallState, context: Context) -> None:
    """An abort that bypassed the status layer (e.g. health's NOT_FOUND) still has a code."""
    if state.code is grpc.StatusCode.OK:
        code = context.code()
        state.code = code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
