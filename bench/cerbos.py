"""`python -m bench.cerbos`: the bench's Check policy in a Cerbos PDP, driven the same way.

The comparison point for `PolicyService/Check (2x2, …)`: the same rules (a derived role with
a condition, an ALLOW, a DENY on session labels) as a Cerbos resource policy, the same request
shape (one principal, 2 resources x 2 actions, `CheckResources`), the same h2load load shape
and CPU placement, and the same bare grpc.aio echo ceiling for the ratio. Cerbos has no
sessions, so the labels travel as a principal attribute.

Needs the Cerbos binary: `npm install @cerbos/cerbos-linux-x64` ships it; point `CERBOS_BIN`
at `node_modules/@cerbos/cerbos-linux-x64/cerbos-linux-x64` (`make bench` installs it under
.venv/node and passes it, so its report carries the Cerbos row beside ours). h2load only sees
HTTP statuses, so correctness is checked once up front: the decisions must be ALLOW, ALLOW,
ALLOW, DENY (as trustplane decides them).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from bench import echo, report, servers
from bench.h2load import LoadShape
from bench.measure import Measurement, Target, measure
from bench.report import Scored

SERVICE = "cerbos.svc.v1.CerbosService"
PATH = f"/{SERVICE}/CheckResources"
NAME = "Cerbos PDP CheckResources (2x2, same policy)"
EXPECTED = [["EFFECT_ALLOW", "EFFECT_ALLOW"], ["EFFECT_ALLOW", "EFFECT_DENY"]]

DERIVED_ROLES = """
apiVersion: api.cerbos.dev/v1
derivedRoles:
  name: bench_roles
  definitions:
    - name: owner
      parentRoles: ["member"]
      condition:
        match:
          expr: >-
            has(request.resource.attr.owner) &&
            request.resource.attr.owner == request.principal.id
"""

TOOL_POLICY = """
apiVersion: api.cerbos.dev/v1
resourcePolicy:
  version: default
  resource: tool
  importDerivedRoles: [bench_roles]
  rules:
    - name: members-invoke
      actions: [invoke]
      roles: [member]
      effect: EFFECT_ALLOW
    - name: owners-configure
      actions: [configure]
      derivedRoles: [owner]
      effect: EFFECT_ALLOW
    - name: no-exfiltration
      actions: [invoke]
      roles: ["*"]
      effect: EFFECT_DENY
      condition:
        match:
          expr: >-
            request.resource.id in ['send_email', 'http_post'] &&
            'untrusted_input' in request.principal.attr.session_labels &&
            'private_data' in request.principal.attr.session_labels
"""

REQUEST = {
    "requestId": "bench",
    "principal": {
        "id": "bench-user",
        "roles": ["member"],
        "attr": {"session_labels": ["private_data"]},
    },
    "resources": [
        {
            "actions": ["invoke", "configure"],
            "resource": {"kind": "tool", "id": "search", "attr": {"owner": "bench-user"}},
        },
        {"actions": ["invoke", "configure"], "resource": {"kind": "tool", "id": "send_email"}},
    ],
}


def _config(directory: Path, grpc_port: int, http_port: int) -> str:
    return f"""
server:
  httpListenAddr: "127.0.0.1:{http_port}"
  grpcListenAddr: "127.0.0.1:{grpc_port}"
storage:
  driver: disk
  disk:
    directory: {directory}
    watchForChanges: false
audit:
  enabled: false
telemetry:
  disabled: true
"""


@contextlib.asynccontextmanager
async def cerbos(
    binary: str, placement: servers.Placement, workdir: Path
) -> AsyncIterator[tuple[str, int]]:
    """A Cerbos PDP with the bench policy; yields its gRPC address and pid once it answers."""
    policies = workdir / "policies"
    policies.mkdir()
    (policies / "derived_roles.yaml").write_text(DERIVED_ROLES)
    (policies / "tool.yaml").write_text(TOOL_POLICY)
    grpc_port, http_port = servers.free_port(), servers.free_port()
    config = workdir / "cerbos.yaml"
    config.write_text(_config(policies, grpc_port, http_port))
    log = (workdir / "cerbos.log").open("wb")
    args = [*placement.server_prefix(), binary, "server", f"--config={config}"]
    proc = await asyncio.create_subprocess_exec(*args, stdout=log, stderr=log)
    address = f"127.0.0.1:{grpc_port}"
    try:
        await _wait_ready(address)
        yield address, proc.pid
    finally:
        proc.terminate()
        await proc.wait()
        log.close()


async def _wait_ready(address: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            await asyncio.to_thread(_request_bytes, address)
            return
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def _request_bytes(address: str) -> tuple[bytes, Any]:
    """The encoded CheckResources request (message types from server reflection) and the
    decoded response to one real call."""
    with grpc.insecure_channel(address) as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        method = pool.FindServiceByName(SERVICE).FindMethodByName("CheckResources")
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        request = json_format.ParseDict(REQUEST, request_class())
        call = channel.unary_unary(
            PATH,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_class.FromString,
        )
        response = call(request, timeout=5)
        return request.SerializeToString(), json_format.MessageToDict(response)


def _effects(response: Any) -> list[list[str]]:
    return [
        [result["actions"][a] for a in ("invoke", "configure")] for result in response["results"]
    ]


class CerbosError(RuntimeError):
    """The PDP decided the bench request differently from trustplane."""


async def measure_pdp(
    binary: str,
    shape: LoadShape,
    runs: int,
    placement: servers.Placement,
    workdir: Path,
    paired: Target | None = None,
) -> tuple[Measurement, bytes]:
    """Start the PDP, check its decisions once, measure CheckResources with h2load (each run
    after a run of `paired`, when given); the measurement and the request bytes it sent."""
    directory = workdir / "cerbos"
    directory.mkdir()
    async with cerbos(binary, placement, directory) as (address, pid):
        request, response = await asyncio.to_thread(_request_bytes, address)
        if _effects(response) != EXPECTED:
            raise CerbosError(f"unexpected Cerbos decisions {_effects(response)}")
        target = Target(NAME, address, PATH, request, pid=pid)
        measured = await measure(target, shape, runs, directory, placement.load_prefix(), paired)
        return measured, request


async def main_async(binary: str, shape: LoadShape, runs: int) -> int:
    placement = servers.Placement.detect()
    with tempfile.TemporaryDirectory(prefix="trustplane-cerbos-") as tmp:
        workdir = Path(tmp)
        try:
            measured, request = await measure_pdp(binary, shape, runs, placement, workdir)
        except CerbosError as exc:
            print(f"bench.cerbos: {exc}", file=sys.stderr)
            return 1
        ceiling = await _echo(request, shape, runs, placement, workdir)
    print(report.table(ceiling, [Scored(measured, 0.0)]), end="")
    print(
        f"\nMachine: {placement.note}; {shape.requests} requests per run, "
        f"{shape.in_flight} in flight; median of {runs} run(s)."
    )
    return 1 if measured.problems else 0


async def _echo(
    request: bytes, shape: LoadShape, runs: int, placement: servers.Placement, workdir: Path
) -> Measurement:
    async with servers.echo(placement, workdir) as (address, pid):
        target = Target(f"echo ceiling ({echo.PATH[1:]})", address, echo.PATH, request, pid=pid)
        return await measure(target, shape, runs, workdir, placement.load_prefix())


def main() -> int:
    binary = os.environ.get("CERBOS_BIN", "")
    if not binary or not Path(binary).is_file():
        print("bench.cerbos: set CERBOS_BIN to the Cerbos binary", file=sys.stderr)
        return 2
    from bench.__main__ import Settings  # here: bench.__main__ imports this module

    settings = Settings.from_environ()
    return asyncio.run(main_async(binary, settings.shape, settings.runs))


if __name__ == "__main__":
    sys.exit(main())
