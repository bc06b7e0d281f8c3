"""Method specs: what the contract declares about each RPC, read from descriptors at start-up.

The `(trustplane.common.v1.method)` option carries a method's permission, whether it is public,
its idempotency mode and its audit class; `(trustplane.common.v1.secret)` on a response field
marks a one-time secret the idempotency layer must never keep. Interceptors read `MethodSpec`s,
never lists of method-name strings, so the contract stays the single source of truth.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from google.protobuf import descriptor, message, message_factory
from trustplane.common.v1 import options_pb2


class Idempotency(enum.Enum):
    NONE = "none"
    OPTIONAL = "optional"
    REQUIRED = "required"


class AuditClass(enum.Enum):
    ACCESS = "access"
    SECURITY = "security"


_IDEMPOTENCY = {
    options_pb2.IDEMPOTENCY_UNSPECIFIED: Idempotency.NONE,
    options_pb2.IDEMPOTENCY_NONE: Idempotency.NONE,
    options_pb2.IDEMPOTENCY_OPTIONAL: Idempotency.OPTIONAL,
    options_pb2.IDEMPOTENCY_REQUIRED: Idempotency.REQUIRED,
}
_AUDIT = {
    options_pb2.AUDIT_CLASS_UNSPECIFIED: AuditClass.ACCESS,
    options_pb2.AUDIT_CLASS_ACCESS: AuditClass.ACCESS,
    options_pb2.AUDIT_CLASS_SECURITY: AuditClass.SECURITY,
}


class MethodSpecError(ValueError):
    """The contract declares something the server cannot honour; start-up stops."""


@dataclass(frozen=True)
class MethodSpec:
    """One RPC as the interceptors see it."""

    path: str  # "/package.Service/Method", as in grpc.HandlerCallDetails.method
    service: str
    name: str
    permission: str
    public: bool
    idempotency: Idempotency
    audit: AuditClass
    client_streaming: bool
    server_streaming: bool
    # Message classes; None for infrastructure methods we do not own.
    request_type: type[message.Message] | None = None
    response_type: type[message.Message] | None = None
    # The request carries `string request_id` (AIP-155).
    has_request_id: bool = False
    # The response has a field marked `(trustplane.common.v1.secret)`, at any depth: a
    # one-time secret that must never be kept for replay.
    secret_response: bool = False

    @property
    def unary(self) -> bool:
        return not (self.client_streaming or self.server_streaming)


def spec_from_descriptor(method: descriptor.MethodDescriptor) -> MethodSpec:
    """Read the method's options; a method without the option gets the strictest defaults."""
    policy = method.GetOptions().Extensions[options_pb2.method]
    service = method.containing_service.full_name
    return MethodSpec(
        path=f"/{service}/{method.name}",
        service=service,
        name=method.name,
        permission=policy.permission,
        public=policy.public,
        idempotency=_IDEMPOTENCY[policy.idempotency],
        audit=_AUDIT[policy.audit],
        client_streaming=method.client_streaming,
        server_streaming=method.server_streaming,
        request_type=message_factory.GetMessageClass(method.input_type),
        response_type=message_factory.GetMessageClass(method.output_type),
        has_request_id=_has_request_id(method.input_type),
        secret_response=carries_secret(method.output_type),
    )


def carries_secret(message_type: descriptor.Descriptor) -> bool:
    """Whether a message has a field marked `(trustplane.common.v1.secret)`, at any depth."""
    seen: set[str] = set()
    pending = [message_type]
    while pending:
        current = pending.pop()
        if current.full_name in seen:
            continue
        seen.add(current.full_name)
        for field in current.fields:
            if field.GetOptions().Extensions[options_pb2.secret]:
                return True
            if field.message_type is not None:
                pending.append(field.message_type)
    return False


def _has_request_id(message_type: descriptor.Descriptor) -> bool:
    field = message_type.fields_by_name.get("request_id")
    return field is not None and field.type == descriptor.FieldDescriptor.TYPE_STRING


def public_spec(
    service: str, name: str, *, server_streaming: bool = False, client_streaming: bool = False
) -> MethodSpec:
    """A spec for infrastructure methods we do not own (health, reflection): public, access."""
    return MethodSpec(
        path=f"/{service}/{name}",
        service=service,
        name=name,
        permission="",
        public=True,
        idempotency=Idempotency.NONE,
        audit=AuditClass.ACCESS,
        client_streaming=client_streaming,
        server_streaming=server_streaming,
    )


class MethodRegistry(Mapping[str, MethodSpec]):
    """All methods the server serves, by path; built once, read on every call."""

    def __init__(self, specs: Iterable[MethodSpec] = ()) -> None:
        self._specs: dict[str, MethodSpec] = {}
        for spec in specs:
            self.add(spec)

    def add(self, spec: MethodSpec) -> None:
        if spec.path in self._specs:
            raise MethodSpecError(f"{spec.path} registered twice")
        if spec.public and spec.permission:
            raise MethodSpecError(f"{spec.path} is public and also declares a permission")
        self._specs[spec.path] = spec

    def add_service(self, service: descriptor.ServiceDescriptor) -> None:
        for method in service.methods:
            self.add(spec_from_descriptor(method))

    def require_permissions(self) -> None:
        """Every non-public method must declare the permission it needs, or start-up stops."""
        missing = sorted(
            p for p, spec in self._specs.items() if not spec.public and not spec.permission
        )
        if missing:
            raise MethodSpecError(
                "methods without a permission option (declare one, or public: true): "
                + ", ".join(missing)
            )

    def services(self) -> list[str]:
        return sorted({spec.service for spec in self._specs.values()})

    def __getitem__(self, path: str) -> MethodSpec:
        return self._specs[path]

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)
