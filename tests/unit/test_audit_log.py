"""AuditLog with an in-memory store: group commit limits, back-pressure, durable commits,
retry without loss, checkpoints and proofs from stored nodes; the audit layer's position."""

from __future__ import annotations

import asyncio

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from interceptors.audit import AuditLayer
from interceptors.observe import ObserveLayer
from interceptors.status import StatusLayer
from server.app import build_layers, build_security
from server.audit import merkle
from server.audit.model import CALL, Record, StoredEntry, encode
from server.audit.service import AuditLog, AuditUnavailable, LogInconsistent
from server.cache import MemoryCache
from server.config import AuditConfig, Config
from server.metrics import Metrics
from server.page_token import PageTokens
from server.tokens import LocalKeySource


class FakeStore:
    def __init__(self):
        self.trees: dict[str, merkle.MemoryTree] = {}
        self.bodies: dict[str, list[bytes]] = {}
        self.batches: list[int] = []
        self.checkpoints: dict[str, merkle.SignedCheckpoint] = {}
        self.fail = 0
        self.gate: asyncio.Event | None = None

    async def append(self, groups):
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            self.fail -= 1
            raise ConnectionResetError("down")
        self.batches.append(sum(len(g) for g in groups.values()))
        firsts = {}
        for tenant, records in groups.items():
            tree = self.trees.setdefault(tenant, merkle.MemoryTree())
            bodies = self.bodies.setdefault(tenant, [])
            firsts[tenant] = tree.size
            for record in records:
                body = encode(record, tree.size)
                bodies.append(body)
                tree.append(merkle.leaf_hash(body))
        return firsts

    async def size(self, tenant):
        return self.trees[tenant].size if tenant in self.trees else 0

    async def nodes(self, tenant, wanted):
        tree = self.trees.get(tenant) or merkle.MemoryTree()
        return {w: tree.node(*w) for w in wanted}

    async def entries(self, tenant, where, after, limit):
        found = [
            StoredEntry(i, merkle.leaf_hash(b), b.decode())
            for i, b in enumerate(self.bodies.get(tenant, []))
        ]
        return [e for e in found if e.index > after][:limit]

    async def range(self, tenant, start, end):
        return [e for e in await self.entries(tenant, None, start - 1, end - start)]

    async def latest_checkpoint(self, tenant):
        return self.checkpoints.get(tenant)

    async def save_checkpoint(self, tenant, signed):
        self.checkpoints[tenant] = signed

    async def stale_logs(self):
        return [t for t in self.trees if t not in self.checkpoints]

    async def expire(self, before_ms):
        return 0


class FakeSigner:
    def __init__(self):
        self.key = Ed25519PrivateKey.generate()

    async def ensure_signing_key(self, tenant, name, algorithm):
        return None

    async def sign(self, tenant, name, message):
        return self.key.sign(message), 1, "kid.1"

    async def public_key(self, tenant, name, version):
        pem = self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return pem.decode(), {}, None, 1


def record(tenant="t1", method="/m"):
    return Record(tenant_id=tenant, kind=CALL, time_ms=1, method=method, code="OK")


def make(store=None, **config):
    log = AuditLog(
        store or FakeStore(),
        FakeSigner(),
        AuditConfig(**{"linger": 0.0, **config}),
        PageTokens(b"k" * 32),
        clock=lambda: 1000.0,
    )
    return log


async def test_group_commit_respects_batch_max_and_orders_entries():
    store = FakeStore()
    store.gate = asyncio.Event()
    log = make(store, batch_max=8)
    await log.start()
    for i in range(30):
        assert log.offer(record(method=f"/m{i}"))
    store.gate.set()
    await log.flush()
    await log.close()
    assert sum(store.batches) == 30 and max(store.batches) <= 8
    assert [merkle.leaf_hash(b) for b in store.bodies["t1"]] == [
        store.trees["t1"].node(0, i) for i in range(30)
    ]
    assert [b'"/m%d"' % i in body for i, body in enumerate(store.bodies["t1"])] == [True] * 30


async def test_full_queue_means_back_pressure_not_loss():
    store = FakeStore()
    store.gate = asyncio.Event()
    log = make(store, queue_size=2)
    await log.start()
    accepted = [log.offer(record()) for _ in range(2)]
    await asyncio.sleep(0.01)  # the writer holds those two, blocked in the store
    accepted += [log.offer(record()) for _ in range(4)]
    assert accepted == [True] * 4 + [False] * 2
    waiting = asyncio.create_task(log.put(record()))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    store.gate.set()
    await waiting
    await log.flush()
    await log.close()
    assert store.trees["t1"].size == accepted.count(True) + 1


async def test_durable_commit_returns_indexes_and_failures_are_retried():
    store = FakeStore()
    log = make(store)
    await log.start()
    assert await log.commit([record(), record()]) == [0, 1]
    assert await log.commit([record("t2")]) == [0]
    store.fail = 2
    with pytest.raises(AuditUnavailable):
        await log.commit([record()])
    await asyncio.wait_for(log.flush(), 10)
    await log.close()
    assert store.trees["t1"].size == 3  # the failed batch was committed on a retry


async def test_checkpoint_and_proofs_from_stored_nodes():
    store = FakeStore()
    log = make(store)
    await log.start()
    await log.commit([record() for _ in range(13)])
    signed = await log.checkpoint("t1")
    pem = await log.public_key_pem(signed.key_id)
    key = serialization.load_pem_public_key(pem.encode())
    assert signed.checkpoint.size == 13 and merkle.verify_checkpoint(signed, key)
    assert await log.checkpoint("t1") == signed  # nothing new: reused
    proof = await log.inclusion_proof("t1", 6, 0)
    assert merkle.verify_inclusion(proof.leaf_hash, 6, 13, proof.hashes, signed.checkpoint.root)
    await log.commit([record() for _ in range(6)])
    later = await log.consistency_proof("t1", 13, 0)
    assert later.second_size == 19
    assert merkle.verify_consistency(13, 19, later.first_root, later.second_root, later.hashes)
    store.trees["t1"]._levels[4][0] = bytes(32)  # rewrite a stored node
    await log.commit([record()])
    with pytest.raises(LogInconsistent):
        await log.checkpoint("t1")
    await log.close()


def test_audit_layer_is_second_in_the_chain():
    config = Config.from_environ({})
    cache = MemoryCache()
    security = build_security(config, cache, LocalKeySource())
    layer = AuditLayer(make(), b"k" * 32)
    layers = build_layers(config, Metrics(), cache, security, layer)
    assert [type(x) for x in layers[:3]] == [ObserveLayer, AuditLayer, StatusLayer]
    assert len(layers) == len(build_layers(config, Metrics(), cache, security)) + 1
