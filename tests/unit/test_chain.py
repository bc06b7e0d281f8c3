"""The interceptor chain: order pinned, composition outermost first, options read from
descriptors."""

from __future__ import annotations

import pytest
from tptest.v1 import test_service_pb2

from interceptors.audit import AuditLayer
from interceptors.authenticate import AuthenticateLayer
from interceptors.authorize import AuthorizeLayer
from interceptors.chain import Chain
from interceptors.idempotency import IdempotencyLayer
from interceptors.observe import ObserveLayer
from interceptors.rate_limit import RateLimitLayer
from interceptors.status import StatusLayer
from server.app import build_layers, build_security, infrastructure_methods
from server.cache import MemoryCache
from server.config import Config
from server.methods import Idempotency, MethodRegistry, MethodSpecError, public_spec
from server.metrics import Metrics
from server.tokens import LocalKeySource


def test_layer_order_is_pinned():
    config = Config.from_environ({})
    cache = MemoryCache()
    security = build_security(config, cache, LocalKeySource())
    audit = AuditLayer(sink=None, digest_key=b"k")  # the sink is never called here
    layers = build_layers(config, Metrics(), cache, security, audit)
    assert [type(layer) for layer in layers] == [
        ObserveLayer,
        AuditLayer,
        StatusLayer,
        AuthenticateLayer,
        RateLimitLayer,
        AuthorizeLayer,
        IdempotencyLayer,
    ]


class _Recording:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wrap(self, method, call):
        async def wrapped(request, context):
            self.log.append(f"{self.name}>")
            try:
                return await call(request, context)
            finally:
                self.log.append(f"<{self.name}")

        return wrapped


async def test_compose_runs_outermost_first():
    log: list[str] = []
    chain = Chain([_Recording("a", log), _Recording("b", log)], MethodRegistry())

    async def handler(request, context):
        log.append("handler")
        return request

    call = chain.compose(public_spec("s", "m"), handler)
    assert await call("x", None) == "x"
    assert log == ["a>", "b>", "handler", "<b", "<a"]


def test_options_are_read_from_descriptors():
    registry = MethodRegistry()
    registry.add_service(test_service_pb2.DESCRIPTOR.services_by_name["TestService"])
    echo = registry["/tptest.v1.TestService/Echo"]
    assert echo.public and echo.permission == "" and echo.idempotency is Idempotency.NONE
    stream = registry["/tptest.v1.TestService/StreamEcho"]
    assert stream.server_streaming and not stream.unary


def test_registry_refuses_duplicates_and_public_with_permission():
    registry = infrastructure_methods()
    with pytest.raises(MethodSpecError, match="registered twice"):
        registry.add(public_spec("grpc.health.v1.Health", "Check"))
    spec = public_spec("x.Y", "Z")
    bad = type(spec)(**{**spec.__dict__, "permission": "x.read"})
    with pytest.raises(MethodSpecError, match="public and also declares"):
        MethodRegistry([bad])
