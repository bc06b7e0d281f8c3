"""The audit log's Merkle core: RFC 6962 known answers, proofs against a naive reference, the
perfect-subtree storage contract, and signed checkpoints."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from server.audit.merkle import (
    EMPTY_ROOT,
    Checkpoint,
    MemoryTree,
    PrivateKey,
    SignedCheckpoint,
    completed_nodes,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root,
    root_from_nodes,
    sign_checkpoint,
    signer_for,
    verify_checkpoint,
    verify_consistency,
    verify_inclusion,
)

# No example database: nothing is written into the source tree.
FEW = settings(max_examples=40, deadline=None, database=None)
SOME = settings(max_examples=80, deadline=None, database=None)

# -- the naive RFC 6962 §2.1 reference, straight from the definitions --------------------------


def _k(n):
    """The largest power of two smaller than n (n > 1)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_mth(hashes):
    if not hashes:
        return hashlib.sha256(b"").digest()
    if len(hashes) == 1:
        return hashes[0]
    k = _k(len(hashes))
    return node_hash(ref_mth(hashes[:k]), ref_mth(hashes[k:]))


def ref_path(m, hashes):
    if len(hashes) <= 1:
        return []
    k = _k(len(hashes))
    if m < k:
        return [*ref_path(m, hashes[:k]), ref_mth(hashes[k:])]
    return [*ref_path(m - k, hashes[k:]), ref_mth(hashes[:k])]


def ref_shape(m, n):
    """For each audit-path entry (leaf upwards): whether the sibling is on the left."""
    if n <= 1:
        return ()
    k = _k(n)
    if m < k:
        return (*ref_shape(m, k), False)
    return (*ref_shape(m - k, n - k), True)


def ref_subproof(m, hashes, complete):
    n = len(hashes)
    if m == n:
        return [] if complete else [ref_mth(hashes)]
    k = _k(n)
    if m <= k:
        return [*ref_subproof(m, hashes[:k], complete), ref_mth(hashes[k:])]
    return [*ref_subproof(m - k, hashes[k:], False), ref_mth(hashes[:k])]


def ref_proof(m, hashes):
    return ref_subproof(m, hashes, True) if 0 < m < len(hashes) else []


def ref_perfect_nodes(hashes):
    n, out, level = len(hashes), set(), 0
    while (1 << level) <= n:
        width = 1 << level
        for index in range(n // width):
            out.add((level, index, ref_mth(hashes[index * width : (index + 1) * width])))
        level += 1
    return out


MAX = 300
LEAVES = [leaf_hash(i.to_bytes(4, "big")) for i in range(MAX)]
TREE = MemoryTree(LEAVES)


class Reads:
    """A node reader over TREE that checks it is asked only for perfect subtrees inside size."""

    def __init__(self, size):
        self.size, self.count = size, 0

    def __call__(self, level, index):
        assert level >= 0
        assert index >= 0
        assert (index + 1) << level <= self.size, (level, index, self.size)
        self.count += 1
        return TREE.node(level, index)


def flip(value, position):
    data = bytearray(value)
    data[position % len(data)] ^= 0x01
    return bytes(data)


# -- known answers: transparency-dev/merkle testonly/constants.go + proof/verify_test.go ---------
# (the RFC 6962 vectors used by Trillian and Certificate Transparency's merkle_tree_test)

KAT_INPUTS = [
    bytes.fromhex(h)
    for h in (
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    )
]
KAT_ROOTS = [
    bytes.fromhex(h)
    for h in (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    )
]
KAT_NODES = [
    [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "0298d122906dcfc10892cb53a73992fc5b9f493ea4c9badb27b791b4127a7fe7",
        "07506a85fd9dd2f120eb694f86011e5bb4662e5c415a62917033d4a9624487e7",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "4271a26be0d8a84f0bd54c8c302e7cb3a3b5d1fa6780a40bcce2873477dab658",
        "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
        "46f6ffadd3d06a09ff3c5860d2755c8b9819db7df44251788c7d8e3180de8eb1",
    ],
    [
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
    ],
    [
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    ["5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"],
]
# (leaf index, tree size, audit path); verify_test.go numbers leaves from 1, these from 0.
KAT_INCLUSION = [
    (0, 1, []),
    (0, 8, ["96a296d2", "5f083f0a", "6b47aaf2"]),
    (5, 8, ["bc1a0643", "ca854ea1", "d37ee418"]),
    (2, 3, ["fac54203"]),
    (1, 5, ["6e340b9c", "5f083f0a", "bc1a0643"]),
]
KAT_CONSISTENCY = [
    (1, 1, []),
    (1, 8, ["96a296d2", "5f083f0a", "6b47aaf2"]),
    (6, 8, ["0ebc5d34", "ca854ea1", "d37ee418"]),
    (2, 5, ["5f083f0a", "bc1a0643"]),
    (6, 7, ["0ebc5d34", "b08693ec", "d37ee418"]),
]
KAT_BY_PREFIX = {h[:8]: bytes.fromhex(h) for level in KAT_NODES for h in level}
TREE_KAT_LEAVES = [leaf_hash(data) for data in KAT_INPUTS]


def _kat_tree():
    return MemoryTree(leaf_hash(data) for data in KAT_INPUTS)


def test_hash_primitives():
    assert hashlib.sha256(b"").digest() == EMPTY_ROOT == KAT_ROOTS[0]
    assert leaf_hash(b"") == KAT_ROOTS[1]
    assert leaf_hash(b"x") == hashlib.sha256(b"\x00x").digest()
    assert node_hash(b"a", b"b") == hashlib.sha256(b"\x01ab").digest()


@pytest.mark.parametrize("size", range(9))
def test_known_roots(size):
    hashes = [leaf_hash(data) for data in KAT_INPUTS[:size]]
    tree = _kat_tree()
    assert ref_mth(hashes) == KAT_ROOTS[size]
    assert root(hashes) == KAT_ROOTS[size]
    assert tree.root_at(size) == KAT_ROOTS[size]
    assert root_from_nodes(size, tree.node) == KAT_ROOTS[size]
    assert MemoryTree(hashes).root() == KAT_ROOTS[size]


def test_known_perfect_subtree_nodes():
    tree = _kat_tree()
    for level, hashes in enumerate(KAT_NODES):
        for index, expected in enumerate(hashes):
            assert tree.node(level, index) == bytes.fromhex(expected)
    with pytest.raises(ValueError, match="no complete subtree"):
        tree.node(4, 0)


@pytest.mark.parametrize(("index", "size", "path"), KAT_INCLUSION)
def test_known_inclusion_proofs(index, size, path):
    tree = _kat_tree()
    expected = [KAT_BY_PREFIX[p] for p in path]
    assert tree.inclusion_proof(index, size) == expected
    assert verify_inclusion(TREE_KAT_LEAVES[index], index, size, expected, KAT_ROOTS[size])


@pytest.mark.parametrize(("old", "new", "path"), KAT_CONSISTENCY)
def test_known_consistency_proofs(old, new, path):
    tree = _kat_tree()
    expected = [KAT_BY_PREFIX[p] for p in path]
    assert tree.consistency_proof(old, new) == expected
    assert verify_consistency(old, new, KAT_ROOTS[old], KAT_ROOTS[new], expected)


# -- inclusion ------------------------------------------------------------------------------------


@SOME
@given(st.data(), st.integers(1, MAX))
def test_inclusion_matches_reference_and_verifies(data, size):
    index = data.draw(st.integers(0, size - 1), label="index")
    reads = Reads(size)
    proof = inclusion_proof(index, size, reads)
    expected_root = ref_mth(LEAVES[:size])

    assert proof == ref_path(index, LEAVES[:size])
    assert reads.count <= 2 * size.bit_length()
    assert verify_inclusion(LEAVES[index], index, size, proof, expected_root)
    assert TREE.inclusion_proof(index, size) == proof

    if proof:
        element = data.draw(st.integers(0, len(proof) - 1), label="element")
        position = data.draw(st.integers(0, 31), label="byte")
        tampered = [*proof]
        tampered[element] = flip(tampered[element], position)
        assert not verify_inclusion(LEAVES[index], index, size, tampered, expected_root)
        assert not verify_inclusion(LEAVES[index], index, size, proof[:-1], expected_root)
        assert not verify_inclusion(LEAVES[index], index, size, [*proof, proof[0]], expected_root)
    assert not verify_inclusion(flip(LEAVES[index], 0), index, size, proof, expected_root)
    assert not verify_inclusion(LEAVES[index], index, size, proof, flip(expected_root, 7))


@SOME
@given(st.data(), st.integers(1, MAX))
def test_inclusion_rejects_wrong_index_and_size(data, size):
    index = data.draw(st.integers(0, size - 1), label="index")
    proof = TREE.inclusion_proof(index, size)
    tree_root = TREE.root_at(size)
    for other in range(size + 1):
        if other != index:
            assert not verify_inclusion(LEAVES[index], other, size, proof, tree_root)
    assert not verify_inclusion(LEAVES[index], index, 2 * size, proof, tree_root)
    # The size is bound only through the root: another size verifies exactly when its audit
    # path has the same shape (e.g. leaf 0 of 3 and of 4 leaves), hence signed checkpoints.
    shape = ref_shape(index, size)
    for other in range(index + 1, MAX + 1):
        if other != size:
            accepted = verify_inclusion(LEAVES[index], index, other, proof, tree_root)
            assert accepted == (ref_shape(index, other) == shape), other


def test_wrong_size_with_the_same_shape_verifies():
    proof = TREE.inclusion_proof(0, 3)
    assert verify_inclusion(LEAVES[0], 0, 4, proof, TREE.root_at(3))


def test_inclusion_out_of_range():
    for index, size in ((0, 0), (3, 3), (-1, 3), (0, -1)):
        with pytest.raises(ValueError):
            inclusion_proof(index, size, TREE.node)
        assert not verify_inclusion(LEAVES[0], index, size, [], LEAVES[0])
    with pytest.raises(ValueError):
        TREE.inclusion_proof(0, MAX + 1)


def test_verifiers_do_not_raise_on_malformed_input():
    proof = TREE.inclusion_proof(1, 4)
    tree_root = TREE.root_at(4)
    assert verify_inclusion(LEAVES[1], 1, 4, proof, tree_root)
    assert not verify_inclusion(LEAVES[1][:31], 1, 4, proof, tree_root)
    assert not verify_inclusion(LEAVES[1], 1, 4, [proof[0], b""], tree_root)
    assert not verify_inclusion(LEAVES[1], 1, 4, proof, b"")
    assert not verify_consistency(2, 4, TREE.root_at(2), tree_root, [b"short"])
    assert not verify_consistency(4, 2, tree_root, TREE.root_at(2), [])
    assert not verify_consistency(-1, 2, EMPTY_ROOT, TREE.root_at(2), [])
    assert not verify_consistency(2, 4, TREE.root_at(2), tree_root, [])


def test_single_leaf_tree():
    assert verify_inclusion(LEAVES[0], 0, 1, [], LEAVES[0])
    assert not verify_inclusion(LEAVES[0], 0, 1, [], LEAVES[1])
    assert not verify_inclusion(LEAVES[0], 0, 1, [LEAVES[1]], LEAVES[0])


# -- consistency ------------------------------------------------------------------------------


@SOME
@given(st.data(), st.integers(0, MAX))
def test_consistency_matches_reference_and_verifies(data, new):
    old = data.draw(st.integers(0, new), label="old")
    reads = Reads(new)
    proof = consistency_proof(old, new, reads)
    old_root, new_root = ref_mth(LEAVES[:old]), ref_mth(LEAVES[:new])

    assert proof == ref_proof(old, LEAVES[:new])
    assert reads.count <= 2 * new.bit_length()
    assert verify_consistency(old, new, old_root, new_root, proof)
    assert TREE.consistency_proof(old, new) == proof

    position = data.draw(st.integers(0, 31), label="byte")
    assert not verify_consistency(old, new, flip(old_root, position), new_root, proof)
    if old or not new:  # the empty tree is a prefix of every tree: nothing binds new_root
        assert not verify_consistency(old, new, old_root, flip(new_root, position), proof)
    if proof:
        element = data.draw(st.integers(0, len(proof) - 1), label="element")
        tampered = [*proof]
        tampered[element] = flip(tampered[element], position)
        assert not verify_consistency(old, new, old_root, new_root, tampered)
        assert not verify_consistency(old, new, old_root, new_root, proof[:-1])
        assert not verify_consistency(old, new, old_root, new_root, [*proof, proof[0]])
        assert not verify_consistency(old, new, new_root, old_root, proof)


def test_consistency_trivial_cases():
    some = TREE.root_at(5)
    assert consistency_proof(0, 5, TREE.node) == []
    assert consistency_proof(5, 5, TREE.node) == []
    assert verify_consistency(0, 5, EMPTY_ROOT, some, [])
    assert verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    assert not verify_consistency(0, 5, some, some, [])
    assert not verify_consistency(0, 5, EMPTY_ROOT, some, [some])
    assert verify_consistency(5, 5, some, some, [])
    assert not verify_consistency(5, 5, some, TREE.root_at(4), [])
    assert not verify_consistency(5, 5, some, some, [some])


def test_consistency_out_of_range():
    for old, new in ((3, 2), (-1, 2), (0, -1)):
        with pytest.raises(ValueError):
            consistency_proof(old, new, TREE.node)
    with pytest.raises(ValueError):
        TREE.consistency_proof(1, MAX + 1)


# -- the in-memory tree and the storage contract ----------------------------------------------


@FEW
@given(st.lists(st.binary(max_size=12), max_size=70))
def test_root_at_matches_reference(data):
    hashes = [leaf_hash(d) for d in data]
    tree = MemoryTree()
    for i, h in enumerate(hashes):
        assert tree.append(h) == i
    assert tree.size == len(hashes)
    for k in range(len(hashes) + 1):
        assert tree.root_at(k) == ref_mth(hashes[:k])
        assert root(hashes[:k]) == ref_mth(hashes[:k])
    assert tree.root() == ref_mth(hashes)


@SOME
@given(st.integers(0, 200), st.lists(st.integers(1, 40), max_size=12))
def test_completed_nodes_over_batches_are_the_perfect_subtrees(first, batch_sizes):
    sizes = [first, *batch_sizes]
    total = min(sum(sizes), MAX)
    store: dict[tuple[int, int], bytes] = {}
    size = 0
    reads: list[tuple[int, int]] = []
    for batch in sizes:
        batch_leaves = LEAVES[size : min(size + batch, total)]
        reads.clear()

        def read(level, index):
            reads.append((level, index))
            return store[level, index]  # only nodes persisted by earlier batches

        for level, index, value in completed_nodes(size, batch_leaves, read):
            assert (level, index) not in store
            store[level, index] = value
        assert len(reads) <= bin(size).count("1")
        size += len(batch_leaves)
        assert root_from_nodes(size, lambda level, index: store[level, index]) == TREE.root_at(size)

    assert {(lv, ix, h) for (lv, ix), h in store.items()} == ref_perfect_nodes(LEAVES[:total])


def test_completed_nodes_for_one_append():
    tree = MemoryTree(LEAVES[:3])
    added = completed_nodes(3, [LEAVES[3]], tree.node)
    assert added == [(0, 3, LEAVES[3]), (1, 1, TREE.node(1, 1)), (2, 0, TREE.node(2, 0))]
    assert completed_nodes(4, [], tree.node) == []


def test_memory_tree_rejects_bad_input():
    tree = MemoryTree(LEAVES[:5])
    with pytest.raises(ValueError, match="32 bytes"):
        tree.append(b"short")
    with pytest.raises(ValueError, match="32 bytes"):
        tree.extend([LEAVES[5], b"short"])
    assert tree.size == 5  # a rejected batch stores nothing
    for size in (-1, 6):
        with pytest.raises(ValueError):
            tree.root_at(size)
    for level, index in ((0, 5), (1, 2), (3, 0), (-1, 0), (0, -1)):
        with pytest.raises(ValueError):
            tree.node(level, index)
    with pytest.raises(ValueError):
        root_from_nodes(-1, tree.node)
    with pytest.raises(ValueError):
        completed_nodes(-1, [], tree.node)
    with pytest.raises(ValueError):
        root([b"short"])
    assert MemoryTree().root() == EMPTY_ROOT


# -- checkpoints ------------------------------------------------------------------------------

ED25519 = Ed25519PrivateKey.generate()
ED25519_OTHER = Ed25519PrivateKey.generate()
P256 = ec.generate_private_key(ec.SECP256R1())
P256_OTHER = ec.generate_private_key(ec.SECP256R1())
KEYS: dict[str, tuple[PrivateKey, PrivateKey]] = {
    "ed25519": (ED25519, ED25519_OTHER),
    "p256": (P256, P256_OTHER),
}
CHECKPOINT = Checkpoint("trustplane.example/audit/v1", 8, KAT_ROOTS[8], 1_700_000_000_000)


def test_checkpoint_body_is_canonical_text():
    body = CHECKPOINT.body()
    assert body == (
        b"trustplane.example/audit/v1\n8\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=\n"
        b"1700000000000\n"
    )
    assert Checkpoint.from_body(body) == CHECKPOINT


@pytest.mark.parametrize(
    "body",
    [
        b"log\n08\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=\n1\n",
        b"log\n8\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=\n1",
        b"log\n8\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=\n1\n\n",
        b"log\n8\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg\n1\n",
        b"log\n-8\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=\n1\n",
        b"log\n8\nAAAA\n1\n",
        b"\n8\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=\n1\n",
        b"\xff\n8\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=\n1\n",
    ],
)
def test_checkpoint_from_body_rejects_non_canonical(body):
    with pytest.raises(ValueError):
        Checkpoint.from_body(body)


@pytest.mark.parametrize(
    "fields",
    [
        ("", 1, KAT_ROOTS[1], 0),
        ("a\nb", 1, KAT_ROOTS[1], 0),
        ("log", -1, KAT_ROOTS[1], 0),
        ("log", True, KAT_ROOTS[1], 0),
        ("log", 1, b"short", 0),
        ("log", 1, KAT_ROOTS[1], -5),
    ],
)
def test_checkpoint_rejects_bad_fields(fields):
    with pytest.raises(ValueError):
        Checkpoint(*fields)


@pytest.mark.parametrize("kind", sorted(KEYS))
def test_checkpoint_sign_verify_round_trip(kind):
    key, other = KEYS[kind]
    signed = sign_checkpoint(CHECKPOINT, signer_for(key), key_id=f"{kind}-1")
    assert verify_checkpoint(signed, key.public_key())
    assert not verify_checkpoint(signed, other.public_key())
    wrong_kind = P256 if kind == "ed25519" else ED25519
    assert not verify_checkpoint(signed, wrong_kind.public_key())

    restored = SignedCheckpoint.from_dict(json.loads(json.dumps(signed.to_dict())))
    assert restored == signed
    assert verify_checkpoint(restored, key.public_key())


@pytest.mark.parametrize("kind", sorted(KEYS))
@pytest.mark.parametrize(
    "change",
    [
        {"size": 9},
        {"size": 7},
        {"root": KAT_ROOTS[7]},
        {"timestamp_ms": 1_700_000_000_001},
        {"log_id": "trustplane.example/audit/v2"},
    ],
)
def test_checkpoint_verification_fails_when_changed(kind, change):
    key, _ = KEYS[kind]
    signed = sign_checkpoint(CHECKPOINT, signer_for(key), key_id="k")
    fields = {**signed.to_dict(), **change}
    if "root" in change:
        fields["root"] = base64.b64encode(change["root"]).decode()
    tampered = SignedCheckpoint.from_dict(fields)
    assert not verify_checkpoint(tampered, key.public_key())


@FEW
@given(st.integers(0, 2**63), st.integers(0, 2**63), st.binary(min_size=32, max_size=32))
def test_checkpoint_round_trip_ed25519(size, timestamp_ms, tree_root):
    checkpoint = Checkpoint("log", size, tree_root, timestamp_ms)
    assert Checkpoint.from_body(checkpoint.body()) == checkpoint
    signed = sign_checkpoint(checkpoint, ED25519.sign, "k")
    assert verify_checkpoint(signed, ED25519.public_key())
    assert SignedCheckpoint.from_dict(signed.to_dict()) == signed


def test_signature_bit_flip_and_bad_dicts():
    signed = sign_checkpoint(CHECKPOINT, signer_for(P256), "k")
    fields = signed.to_dict()
    bad_signature = flip(signed.signature, 10)
    assert not verify_checkpoint(
        SignedCheckpoint(signed.checkpoint, "k", bad_signature), P256.public_key()
    )
    assert not verify_checkpoint(SignedCheckpoint(signed.checkpoint, "k", b"x"), P256.public_key())
    for broken in (
        {"size": "8"},
        {"size": True},
        {"root": "not base64!"},
        {"signature": None},
        {"key_id": ""},
        {"log_id": 5},
    ):
        with pytest.raises(ValueError):
            SignedCheckpoint.from_dict({**fields, **broken})
    with pytest.raises(ValueError):
        SignedCheckpoint.from_dict({k: v for k, v in fields.items() if k != "timestamp_ms"})


def test_unsupported_keys():
    p384 = ec.generate_private_key(ec.SECP384R1())
    signed = sign_checkpoint(CHECKPOINT, ED25519.sign, "k")
    with pytest.raises(ValueError, match="P-256"):
        verify_checkpoint(signed, p384.public_key())
    with pytest.raises(ValueError, match="P-256"):
        signer_for(p384)
    with pytest.raises(TypeError):
        verify_checkpoint(signed, "not a key")
    with pytest.raises(TypeError):
        signer_for("not a key")
