"""Token verification details that need a clock or no server: cache bounds, mapping, staleness."""

from __future__ import annotations

import time

import pytest

from server.actor import ActorContext, AuthMethod, DelegateActor, PrincipalType
from server.cache import MemoryCache
from server.revocation import RevocationList
from server.tokens import (
    ClaimMapping,
    CredentialsMalformed,
    JwksFileSource,
    TokenVerifier,
    TrustedIssuer,
    to_actor,
)
from tests.support.tokens import TENANT, TestIdP


def _issuer(idp, mapping=None):
    source = JwksFileSource(idp.jwks_file)
    return TrustedIssuer(idp.issuer, ["trustplane"], source, mapping or ClaimMapping())


async def test_lru_is_bounded_and_never_serves_past_exp(tmp_path):
    idp = TestIdP(tmp_path)
    now = [time.time()]
    verifier = TokenVerifier([_issuer(idp)], leeway=30, cache_size=2, clock=lambda: now[0])
    await verifier.start()
    tokens = [idp.token(sub=f"u{i}", exp=int(now[0]) + 100) for i in range(3)]
    for token in tokens:
        await verifier.verify(token)
    assert verifier.stats()["size"] == 2  # the oldest was evicted
    await verifier.verify(tokens[2])
    assert verifier.hits == 1
    now[0] += 101  # past exp: the cached entry is dropped and the token re-verified
    await verifier.verify(tokens[2])  # still inside the 30 s leeway, so it verifies again
    assert verifier.misses == 4


def test_claim_mapping_with_dotted_paths_and_fixed_tenant(tmp_path):
    idp = TestIdP(tmp_path)
    mapping = ClaimMapping(
        tenant_id=TENANT,
        roles_claim="realm_access.roles",
        scope_claim=None,
        subject_type_claim=None,
    )
    claims = idp.claims(realm_access={"roles": ["admin"]}, scope="openid email", tid=None)
    actor = to_actor(claims, _issuer(idp, mapping))
    assert actor.tenant_id == TENANT
    assert actor.roles == frozenset({"admin"})
    assert actor.scopes is None  # this IdP's scopes are ignored
    assert actor.subject_type is PrincipalType.USER


def test_act_chain_order_and_depth(tmp_path):
    idp = TestIdP(tmp_path)
    claims = idp.claims(act={"sub": "sub-agent", "act": {"sub": "agent"}})
    actor = to_actor(claims, _issuer(idp))
    assert [link.subject for link in actor.act] == ["sub-agent", "agent"]
    assert actor.actor_id == "sub-agent"
    assert actor.chain == ("user-1", "sub-agent", "agent")
    deep: dict[str, object] = {"sub": "a0"}
    for i in range(1, 10):
        deep = {"sub": f"a{i}", "act": deep}
    with pytest.raises(CredentialsMalformed, match="too deep"):
        to_actor(idp.claims(act=deep), _issuer(idp))


def test_derived_from_is_bounded(tmp_path):
    idp = TestIdP(tmp_path)
    issuer = _issuer(idp)
    kept = to_actor(idp.claims(derived_from=[f"k{i}" for i in range(32)]), issuer)
    assert len(kept.derived_from) == 32
    with pytest.raises(CredentialsMalformed, match="derived_from"):
        to_actor(idp.claims(derived_from=[f"k{i}" for i in range(33)]), issuer)


def _actor(**kw):
    base = {
        "tenant_id": "t",
        "subject": "u",
        "subject_type": PrincipalType.USER,
        "auth_method": AuthMethod.JWT,
        "token_id": "j",
        "session_id": "s",
        "issued_at": 10.0,
    }
    base.update(kw)
    return ActorContext(**base)


async def test_revocation_staleness_bound_without_notifications():
    clock = [100.0]
    cache = MemoryCache()
    revocations = RevocationList(cache, staleness=1.0, max_token_ttl=60, clock=lambda: clock[0])
    actor = _actor()
    assert not await revocations.is_revoked(actor)
    await cache.set("rv:jti:j", b"1")  # another process revoked it; its notice was lost
    clock[0] += 0.5
    assert not await revocations.is_revoked(actor)  # within the bound: the memo answers
    clock[0] += 0.6
    assert await revocations.is_revoked(actor)  # past the bound: asked again


async def test_subject_revocation_spares_later_tokens():
    clock = [100.0]
    revocations = RevocationList(
        MemoryCache(), staleness=0, max_token_ttl=60, clock=lambda: clock[0]
    )
    await revocations.revoke_subject("t", "u")
    assert await revocations.is_revoked(_actor(issued_at=99.0))
    assert await revocations.is_revoked(_actor(issued_at=100.0))
    assert not await revocations.is_revoked(_actor(issued_at=101.0, token_id="k"))


async def test_subject_revocation_reaches_every_link_of_the_act_chain():
    """Disabling an agent kills delegated tokens it acts in, however deep in the chain."""
    clock = [100.0]
    revocations = RevocationList(
        MemoryCache(), staleness=0, max_token_ttl=60, clock=lambda: clock[0]
    )
    agent, sub_agent = DelegateActor("agent-1"), DelegateActor("agent-2")
    direct = _actor(subject="u", act=(agent,), issued_at=99.0)
    nested = _actor(subject="u", act=(sub_agent, agent), issued_at=99.0, token_id="n")
    other = _actor(subject="u", act=(DelegateActor("agent-3"),), issued_at=99.0, token_id="o")
    await revocations.revoke_subject("t", "agent-1")
    assert await revocations.is_revoked(direct)
    assert await revocations.is_revoked(nested)
    assert not await revocations.is_revoked(other)
    later = _actor(subject="u", act=(agent,), issued_at=101.0, token_id="l")
    assert not await revocations.is_revoked(later)
