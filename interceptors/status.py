"""Layer 2: turn exceptions into statuses, the one place that does.

`TrustplaneError`s become a rich `google.rpc.Status` (code, message, `ErrorInfo`, and the
`BadRequest` / `RetryInfo` / `QuotaFailure` details they carry). An abort raised deeper in the
chain passes through untouched. Anything else is a bug: it is logged with its traceback and the
client gets the fixed `INTERNAL "internal error"` — never the exception's text.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc.aio

from interceptors.chain import Call, Context
from server import call_state
from server.errors import INTERNAL_ERROR, TrustplaneError, reason_name
from server.methods import MethodSpec

_log = logging.getLogger("trustplane.status")


class StatusLayer:
    """Maps domain errors to statuses; see the module docstring."""

    def wrap(self, method: MethodSpec, call: Call) -> Call:
        async def guarded(request: Any, context: Context) -> Any:
            try:
                return await call(request, context)
            except TrustplaneError as exc:
                await abort(context, exc)
            except grpc.aio.AbortError:
                raise
            except Exception:
                _log.exception("unhandled error", extra={"method": method.path})
                await abort(context, INTERNAL_ERROR)

        return guarded


async def abort(context: Context, error: TrustplaneError) -> None:
    """Record the outcome in the call state and end the call with `error`'s status."""
    state = call_state.current()
    state.code = error.code
    state.reason = reason_name(error.reason)
    status = error.to_status()
    await context.abort(status.code, status.details, status.trailing_metadata)
