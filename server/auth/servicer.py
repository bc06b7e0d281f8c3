"""AuthService gRPC adapter: decode the request, make one Authenticator call, encode."""

from __future__ import annotations

import json
from typing import Any, Protocol

from trustplane.auth.v1 import auth_pb2, auth_pb2_grpc
from trustplane.common.v1 import actor_pb2

from server import call_state, wire
from server.actor import ActorContext, PrincipalType
from server.auth.api_keys import ApiKeys
from server.auth.mfa import Mfa
from server.auth.model import ApiKeyRecord, AuthSession, IssuedTokens, Principal, Tenant
from server.auth.service import Authenticator
from server.errors import FieldViolation, InvalidArgument, Unauthenticated

_TYPES = {
    PrincipalType.USER: actor_pb2.PRINCIPAL_TYPE_USER,
    PrincipalType.AGENT: actor_pb2.PRINCIPAL_TYPE_AGENT,
    PrincipalType.SERVICE_ACCOUNT: actor_pb2.PRINCIPAL_TYPE_SERVICE_ACCOUNT,
}


def _actor() -> ActorContext:
    return call_state.current().require_actor()


def _client(context: Any) -> str:
    """The caller's address without its port (brute-force counters are per client)."""
    peer = context.peer() or "unknown"
    return peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer


class Credentials(Protocol):
    """Verifies a credential given in a request body like the authenticate layer does."""

    async def verify(self, credential: str) -> ActorContext: ...


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    def __init__(
        self, auth: Authenticator, api_keys: ApiKeys, credentials: Credentials, mfa: Mfa
    ) -> None:
        self._auth = auth
        self._api_keys = api_keys
        self._credentials = credentials
        self._mfa = mfa

    async def UpdateAgent(self, request: Any, context: Any) -> Any:
        changes = _changes(request.agent, request.update_mask, _AGENT_FIELDS, "agent")
        agent = await self._auth.update_agent(
            _actor(), request.agent.agent_id, changes, request.agent.etag
        )
        return auth_pb2.UpdateAgentResponse(agent=_agent(agent))

    async def GetTenant(self, request: Any, context: Any) -> Any:
        return auth_pb2.GetTenantResponse(tenant=_tenant(*await self._auth.tenant(_actor())))

    async def UpdateTenant(self, request: Any, context: Any) -> Any:
        changes = _changes(request.tenant, request.update_mask, _TENANT_FIELDS, "tenant")
        updated = await self._auth.update_tenant(
            _actor(), changes.get("display_name"), changes.get("api_key_max_ttl_days")
        )
        return auth_pb2.UpdateTenantResponse(tenant=_tenant(*updated))

    async def GetUser(self, request: Any, context: Any) -> Any:
        return auth_pb2.GetUserResponse(
            user=_user(await self._auth.user(_actor(), request.user_id))
        )

    async def ListUsers(self, request: Any, context: Any) -> Any:
        users, token = await self._auth.list_users(_actor(), request.page_size, request.page_token)
        return auth_pb2.ListUsersResponse(users=[_user(u) for u in users], next_page_token=token)

    async def UpdateUser(self, request: Any, context: Any) -> Any:
        changes = _changes(request.user, request.update_mask, _USER_FIELDS, "user")
        user = await self._auth.update_user(
            _actor(), request.user.user_id, changes, request.user.etag
        )
        return auth_pb2.UpdateUserResponse(user=_user(user))

    async def CreateInvitation(self, request: Any, context: Any) -> Any:
        invitation_id, token, expires = await self._auth.invite(
            _actor(), request.email, request.role, request.request_id
        )
        return auth_pb2.CreateInvitationResponse(
            invitation_id=invitation_id, token=token, expire_time=wire.timestamp(expires)
        )

    async def RevokeInvitation(self, request: Any, context: Any) -> Any:
        await self._auth.revoke_invitation(_actor(), request.invitation_id)
        return auth_pb2.RevokeInvitationResponse()

    async def AcceptInvitation(self, request: Any, context: Any) -> Any:
        user, tenant = await self._auth.accept_invitation(
            _required(request.token, "token"), request.password, request.display_name
        )
        return auth_pb2.AcceptInvitationResponse(actor=_principal_actor(user), tenant=tenant)

    async def EnrollMfa(self, request: Any, context: Any) -> Any:
        secret, uri = await self._mfa.enroll(await self._auth.own_user(_actor()))
        return auth_pb2.EnrollMfaResponse(secret=secret, otpauth_uri=uri)

    async def ConfirmMfa(self, request: Any, context: Any) -> Any:
        user = await self._auth.own_user(_actor())
        codes = await self._mfa.confirm(user, _required(request.code, "code"))
        return auth_pb2.ConfirmMfaResponse(recovery_codes=codes)

    async def DisableMfa(self, request: Any, context: Any) -> Any:
        user = await self._auth.own_user(_actor())
        await self._mfa.disable(user, _required(request.code, "code"))
        return auth_pb2.DisableMfaResponse()

    async def ExchangeToken(self, request: Any, context: Any) -> Any:
        subject = await self._credentials.verify(_required(request.subject_token, "subject_token"))
        actor = await self._credentials.verify(_required(request.actor_token, "actor_token"))
        token, expires, scopes = await self._auth.exchange(
            subject, actor, list(request.scopes), request.audience, request.agent_session_id
        )
        return auth_pb2.ExchangeTokenResponse(
            access_token=token, expire_time=wire.timestamp(expires), scopes=scopes
        )

    async def IntrospectToken(self, request: Any, context: Any) -> Any:
        caller = _actor()
        try:
            token = await self._credentials.verify(_required(request.token, "token"))
        except Unauthenticated:
            return auth_pb2.IntrospectTokenResponse(active=False)
        if token.tenant_id != caller.tenant_id:
            return auth_pb2.IntrospectTokenResponse(active=False)
        return auth_pb2.IntrospectTokenResponse(
            active=True,
            actor=encode_actor(token),
            scopes=sorted(token.scopes or ()),
            scoped=token.scopes is not None,
            roles=sorted(token.roles),
            issue_time=wire.timestamp(token.issued_at),
            expire_time=wire.timestamp(token.expires_at),
            token_id=token.token_id or "",
            session_id=token.session_id or "",
            issuer=token.issuer,
        )

    async def RevokeToken(self, request: Any, context: Any) -> Any:
        try:
            token = await self._credentials.verify(_required(request.token, "token"))
        except Unauthenticated:
            return auth_pb2.RevokeTokenResponse()  # RFC 7009: unknown tokens are not an error
        await self._auth.revoke_token(_actor(), token)
        return auth_pb2.RevokeTokenResponse()

    async def Login(self, request: Any, context: Any) -> Any:
        tokens, principal = await self._auth.login(
            request.tenant,
            request.email,
            request.password,
            _client(context),
            request.totp_code,
            request.recovery_code,
        )
        return auth_pb2.LoginResponse(
            tokens=_tokens(tokens), actor=_principal_actor(principal), roles=principal.roles
        )

    async def Refresh(self, request: Any, context: Any) -> Any:
        tokens = await self._auth.refresh(request.refresh_token)
        return auth_pb2.RefreshResponse(tokens=_tokens(tokens))

    async def WhoAmI(self, request: Any, context: Any) -> Any:
        actor = _actor()
        return auth_pb2.WhoAmIResponse(
            actor=encode_actor(actor),
            roles=sorted(actor.roles),
            scopes=sorted(actor.scopes or ()),
            scoped=actor.scopes is not None,
            session_id=actor.session_id or "",
            auth_method=actor.auth_method.value,
        )

    async def GetJwks(self, request: Any, context: Any) -> Any:
        return auth_pb2.GetJwksResponse(jwks=json.dumps(await self._auth.jwks()))

    async def ListSessions(self, request: Any, context: Any) -> Any:
        actor = _actor()
        sessions, token = await self._auth.sessions(
            actor, request.principal_id, request.page_size, request.page_token
        )
        return auth_pb2.ListSessionsResponse(
            sessions=[_session(s, actor.session_id) for s in sessions], next_page_token=token
        )

    async def RevokeSession(self, request: Any, context: Any) -> Any:
        await self._auth.revoke_session(_actor(), request.session_id)
        return auth_pb2.RevokeSessionResponse()

    async def RevokeAllSessions(self, request: Any, context: Any) -> Any:
        revoked = await self._auth.revoke_all(_actor(), request.principal_id)
        return auth_pb2.RevokeAllSessionsResponse(revoked=revoked)

    async def CreateAgent(self, request: Any, context: Any) -> Any:
        agent = await self._auth.create_agent(
            _MANAGED_TYPES.get(request.principal_type, PrincipalType.AGENT),
            _actor(),
            request.display_name,
            request.purpose,
            list(request.roles),
            list(request.scopes) or None,
            wire.seconds(request, "expire_time"),
            request.request_id,
        )
        return auth_pb2.CreateAgentResponse(agent=_agent(agent))

    async def GetAgent(self, request: Any, context: Any) -> Any:
        return auth_pb2.GetAgentResponse(
            agent=_agent(await self._auth.agent(_actor(), request.agent_id))
        )

    async def ListAgents(self, request: Any, context: Any) -> Any:
        agents, token = await self._auth.list_agents(
            _actor(),
            request.page_size,
            request.page_token,
            _MANAGED_TYPES.get(request.principal_type),
        )
        return auth_pb2.ListAgentsResponse(
            agents=[_agent(a) for a in agents], next_page_token=token
        )

    async def SetAgentDisabled(self, request: Any, context: Any) -> Any:
        agent = await self._auth.set_agent_disabled(
            _actor(), request.agent_id, request.disabled, self._api_keys
        )
        return auth_pb2.SetAgentDisabledResponse(agent=_agent(agent))

    async def CreateApiKey(self, request: Any, context: Any) -> Any:
        owner = await self._auth.managed_principal(_actor(), request.principal_id)
        key, record = await self._api_keys.create(
            owner,
            list(request.scopes),
            wire.seconds(request, "expire_time") or 0.0,
            request.display_name,
            request.request_id,
        )
        return auth_pb2.CreateApiKeyResponse(api_key=key, metadata=_api_key(record))

    async def RotateApiKey(self, request: Any, context: Any) -> Any:
        owner, old = await self._auth.api_key_of(_actor(), request.key_id)
        key, record, previous = await self._api_keys.rotate(
            owner, old, float(request.overlap_seconds), request.request_id
        )
        return auth_pb2.RotateApiKeyResponse(
            api_key=key, metadata=_api_key(record), previous=_api_key(previous)
        )

    async def ListApiKeys(self, request: Any, context: Any) -> Any:
        owner = await self._auth.managed_principal(_actor(), request.principal_id)
        records = await self._api_keys.list(owner)
        return auth_pb2.ListApiKeysResponse(api_keys=[_api_key(r) for r in records])

    async def RevokeApiKey(self, request: Any, context: Any) -> Any:
        await self._auth.revoke_api_key(_actor(), request.key_id, self._api_keys)
        return auth_pb2.RevokeApiKeyResponse()


_AGENT_FIELDS = {
    "display_name": "display_name",
    "purpose": "purpose",
    "roles": "roles",
    "scopes": "scopes",
    "expire_time": "expires_at",
}
_TENANT_FIELDS = {"display_name": "display_name", "api_key_max_ttl_days": "api_key_max_ttl_days"}
_MANAGED_TYPES = {
    actor_pb2.PRINCIPAL_TYPE_AGENT: PrincipalType.AGENT,
    actor_pb2.PRINCIPAL_TYPE_SERVICE_ACCOUNT: PrincipalType.SERVICE_ACCOUNT,
}
_USER_FIELDS = {"display_name": "display_name", "roles": "roles", "disabled": "disabled"}


def _changes(message: Any, mask: Any, fields: dict[str, str], prefix: str) -> dict[str, Any]:
    """Translate a field mask into column changes; unknown paths are INVALID_ARGUMENT."""
    paths = list(mask.paths)
    unknown = [p for p in paths if p not in fields]
    if not paths or unknown:
        raise InvalidArgument.fields(
            FieldViolation("update_mask", f"must name some of: {', '.join(sorted(fields))}")
        )
    changes: dict[str, Any] = {}
    for path in paths:
        value = getattr(message, path)
        if path == "expire_time":
            value = wire.seconds(message, "expire_time")
        elif path in ("roles", "scopes"):
            value = list(value) or (None if path == "scopes" else [])
        changes[fields[path]] = value
    if prefix == "agent" and "display_name" in changes and not changes["display_name"]:
        raise InvalidArgument.fields(FieldViolation("agent.display_name", "required"))
    return changes


def _tenant(tenant: Tenant, display_name: str, days: int) -> auth_pb2.Tenant:
    return auth_pb2.Tenant(
        tenant_id=tenant.id, name=tenant.name, display_name=display_name, api_key_max_ttl_days=days
    )


def _user(user: Principal) -> auth_pb2.User:
    return auth_pb2.User(
        user_id=user.id,
        email=user.email or "",
        display_name=user.display_name,
        roles=user.roles,
        disabled=user.disabled,
        mfa_enabled=user.mfa_enabled,
        last_seen_time=wire.timestamp(user.last_seen_at),
        create_time=wire.timestamp(user.created_at),
        etag=user.etag,
    )


def _required(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument.fields(FieldViolation(field, "required"))
    return value


def _agent(agent: Principal) -> auth_pb2.Agent:
    return auth_pb2.Agent(
        agent_id=agent.id,
        display_name=agent.display_name,
        purpose=agent.purpose,
        owner_id=agent.owner_id or "",
        roles=agent.roles,
        scopes=agent.scopes or (),
        expire_time=wire.timestamp(agent.expires_at),
        disabled=agent.disabled,
        last_seen_time=wire.timestamp(agent.last_seen_at),
        create_time=wire.timestamp(agent.created_at),
        etag=agent.etag,
        principal_type=_TYPES[agent.type],
    )


def _api_key(record: ApiKeyRecord) -> auth_pb2.ApiKey:
    return auth_pb2.ApiKey(
        key_id=record.id,
        principal_id=record.principal_id,
        scopes=record.scopes or (),
        display_name=record.display_name,
        create_time=wire.timestamp(record.created_at),
        expire_time=wire.timestamp(record.expires_at),
        last_used_time=wire.timestamp(record.last_used_at),
        revoke_time=wire.timestamp(record.revoked_at),
    )


def _tokens(tokens: IssuedTokens) -> auth_pb2.TokenPair:
    return auth_pb2.TokenPair(
        access_token=tokens.access_token,
        access_token_expire_time=wire.timestamp(tokens.access_expires_at),
        refresh_token=tokens.refresh_token,
        refresh_token_expire_time=wire.timestamp(tokens.refresh_expires_at),
        session_id=tokens.session_id,
    )


def _principal_actor(principal: Principal) -> actor_pb2.Actor:
    return actor_pb2.Actor(
        tenant_id=principal.tenant_id, subject_id=principal.id, subject_type=_TYPES[principal.type]
    )


def encode_actor(actor: ActorContext) -> actor_pb2.Actor:
    """The ActorContext as the shared Actor message, the act chain nested (RFC 8693 order)."""
    message = actor_pb2.Actor(
        tenant_id=actor.tenant_id, subject_id=actor.subject, subject_type=_TYPES[actor.subject_type]
    )
    link = message
    for delegate in actor.act:
        link.act.CopyFrom(
            actor_pb2.Actor(
                tenant_id=actor.tenant_id,
                subject_id=delegate.subject,
                subject_type=_TYPES[delegate.subject_type],
            )
        )
        link = link.act
    return message


def _session(session: AuthSession, current: str | None) -> auth_pb2.AuthSession:
    return auth_pb2.AuthSession(
        session_id=session.id,
        create_time=wire.timestamp(session.created_at),
        expire_time=wire.timestamp(session.expires_at),
        last_refresh_time=wire.timestamp(session.last_refresh_at),
        current=session.id == current,
        principal_id=session.principal_id,
    )
