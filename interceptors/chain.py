"""One grpc.aio interceptor that runs an ordered list of layers around every handler.

grpc.aio interceptors only see the method name and metadata; to see requests and outcomes
they must wrap the returned `RpcMethodHandler`. Doing that once per method (not per call) and
composing all layers into one function keeps the per-call cost to one dictionary lookup and the
layers' own work. Layers are outermost first; each may return the call unchanged for methods it
does not apply to, which costs nothing at run time.

Every behaviour is normalised to one shape, `async (request_or_iterator, context) -> response`:
server-streaming handlers written as async generators are adapted to write through
`context.write`, so every layer handles unary and streaming calls alike.
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeAlias

import grpc
import grpc.aio

from server.methods import MethodRegistry, MethodSpec

Context = grpc.aio.ServicerContext[Any, Any]
Call = Callable[[Any, Context], Awaitable[Any]]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class Layer(Protocol):
    """One position in the chain."""

    def wrap(self, method: MethodSpec, call: Call) -> Call:
        """Return `call` wrapped with this layer's behaviour (or `call` itself)."""
        ...


class Chain(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Wraps every known method's handler with `layers` (outermost first), once per method."""

    def __init__(self, layers: Sequence[Layer], registry: MethodRegistry) -> None:
        self._layers = tuple(layers)
        self._registry = registry
        self._handlers: dict[str, Handler] = {}

    @property
    def layers(self) -> tuple[Layer, ...]:
        return self._layers

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        path = handler_call_details.method
        handler = self._handlers.get(path)
        if handler is not None:
            return handler
        spec = self._registry.get(path)
        found = await continuation(handler_call_details)
        if spec is None or found is None:
            # Unknown to the contract: never served, whatever handler might exist (fail closed).
            return None  # type: ignore[return-value]
        handler = self._handlers[path] = self._wrap_handler(spec, found)
        return handler

    def _wrap_handler(self, spec: MethodSpec, handler: Handler) -> Handler:
        call = self.compose(spec, _behaviour(handler))
        kind = _KINDS[(spec.client_streaming, spec.server_streaming)]
        factory = getattr(grpc, f"{kind}_rpc_method_handler")
        deserializer = handler.request_deserializer
        if deserializer is not None and not spec.client_streaming:
            deserializer = _keeping_bytes(deserializer)
        wrapped: Handler = factory(
            call,
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )
        return wrapped

    def compose(self, spec: MethodSpec, call: Call) -> Call:
        for layer in reversed(self._layers):
            call = layer.wrap(spec, call)
        return call


# The bytes a unary request arrived as, beside the message parsed from them. grpc.aio parses
# the request in the task that then runs the handler, so a layer of the same call sees it.
_received: contextvars.ContextVar[tuple[object, bytes] | None] = contextvars.ContextVar(
    "trustplane_received_request", default=None
)


def _keeping_bytes(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(raw: bytes) -> Any:
        request = deserializer(raw)
        _received.set((request, raw))
        return request

    return deserialize


def received_bytes(request: object) -> bytes | None:
    """The bytes `request` was parsed from, when it is the unary request of this call
    (None otherwise: a client stream, or a message made elsewhere)."""
    kept = _received.get()
    if kept is None or kept[0] is not request:
        return None
    return kept[1]


_KINDS = {
    (False, False): "unary_unary",
    (False, True): "unary_stream",
    (True, False): "stream_unary",
    (True, True): "stream_stream",
}


def _behaviour(handler: Handler) -> Call:
    function = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )
    if inspect.isasyncgenfunction(function):
        return _writing(function)
    if not inspect.iscoroutinefunction(function):
        raise TypeError(f"{function!r} is not async; trustplane serves grpc.aio handlers only")
    return function


def _writing(generator: Callable[[Any, Context], AsyncIterator[Any]]) -> Call:
    """Adapt an async-generator handler to the coroutine shape (responses via context.write)."""

    async def call(request: Any, context: Context) -> None:
        async for response in generator(request, context):
            await context.write(response)

    return call
