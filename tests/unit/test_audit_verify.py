"""The offline verifier on synthetic exports: every kind of tampering is reported with its
index; wrong keys, redacted entries and trusted checkpoints."""

from __future__ import annotations

import base64
import json

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from server.audit import merkle
from server.audit.model import CALL, Record, canonical_json, encode, encode_all, log_id
from server.audit.verify import verify_export

KEY = Ed25519PrivateKey.generate()
LOG = log_id("t")


def _b64(data):
    return base64.b64encode(data).decode()


def build(n=10, redact=()):
    bodies = [encode(Record("t", CALL, 1, f"/m{i}", "OK"), i) for i in range(n)]
    tree = merkle.MemoryTree(merkle.leaf_hash(b) for b in bodies)
    checkpoint = merkle.Checkpoint(LOG, n, tree.root(), 5)
    signed = merkle.sign_checkpoint(checkpoint, KEY.sign, "kid.1")
    head = {"type": "checkpoint", "start_index": 0, "complete": True, **signed.to_dict()}
    lines = [json.dumps(head)]
    for i, body in enumerate(bodies):
        entry = {
            "type": "entry",
            "index": i,
            "leaf_hash": _b64(tree.node(0, i)),
            "proof": [_b64(h) for h in tree.inclusion_proof(i)],
            "body": None if i in redact else body.decode(),
        }
        lines.append(json.dumps(entry))
    return lines, signed


def indexes(lines, **kw):
    report = verify_export(lines, KEY.public_key(), **kw)
    return {p.index for p in report.problems}, report


def test_a_clean_export_verifies_including_redacted_entries():
    lines, _ = build(redact={0, 1, 2})
    found, report = indexes(lines)
    assert found == set() and report.ok and report.entries == 10
    assert (report.expired, report.first_retained, report.first_retained_ms) == (3, 3, 1)


def test_a_body_removed_after_a_kept_one_is_tampering():
    """Retention removes the oldest bodies only: a hole after a kept body hides an entry."""
    lines, _ = build(redact={0, 1, 5, 8})
    found, report = indexes(lines)
    assert found == {5, 8} and not report.ok
    assert report.expired == 2 and "out of retention order" in report.problems[0].message
    everything, _ = build(redact=set(range(10)))
    found, report = indexes(everything)
    assert found == set() and report.expired == 10 and report.first_retained is None


def test_edited_entry():
    lines, _ = build()
    lines[5] = lines[5].replace("/m4", "/mX")
    assert indexes(lines)[0] == {4}


def test_deleted_entry():
    lines, _ = build()
    del lines[7]
    assert indexes(lines)[0] == {6}


def test_inserted_entries():
    lines, _ = build()
    duplicate = lines[3]
    beyond = json.loads(lines[4])
    beyond["index"] = 10
    assert indexes([*lines, duplicate])[0] == {2}
    assert indexes([*lines, json.dumps(beyond)])[0] == {10}


def test_reordered_lines_and_moved_bodies():
    lines, _ = build()
    lines[3], lines[4] = lines[4], lines[3]
    assert indexes(lines)[0] == {2}
    lines, _ = build()
    a, b = json.loads(lines[3]), json.loads(lines[4])
    a["body"], b["body"] = b["body"], a["body"]
    lines[3], lines[4] = json.dumps(a), json.dumps(b)
    assert indexes(lines)[0] == {2, 3}


def test_wrong_key_or_resigned_checkpoint():
    lines, _ = build()
    report = verify_export(lines, Ed25519PrivateKey.generate().public_key())
    assert not report.ok and [p.index for p in report.problems] == [None]
    assert not verify_export(["not json"], KEY.public_key()).ok


def test_trusted_checkpoint_catches_truncation_and_rewrites():
    lines, trusted = build(10)
    shorter, _ = build(6)
    found, report = indexes(shorter, trusted=trusted)
    assert not report.ok and found == {9}
    assert indexes(lines, trusted=trusted)[1].ok
    _, old = build(4)
    rewritten = [line.replace("/m1", "/mZ") for line in lines]  # and re-signed
    bodies = [json.loads(x)["body"].encode() for x in rewritten[1:]]
    tree = merkle.MemoryTree(merkle.leaf_hash(b) for b in bodies)
    signed = merkle.sign_checkpoint(merkle.Checkpoint(LOG, 10, tree.root(), 6), KEY.sign, "kid.1")
    head = {"type": "checkpoint", "start_index": 0, "complete": True, **signed.to_dict()}
    entries = []
    for i, body in enumerate(bodies):
        proof = [_b64(h) for h in tree.inclusion_proof(i)]
        entries.append(
            json.dumps(
                {
                    "type": "entry",
                    "index": i,
                    "proof": proof,
                    "body": body.decode(),
                    "leaf_hash": "",
                }
            )
        )
    assert verify_export([json.dumps(head), *entries], KEY.public_key()).ok
    report = verify_export([json.dumps(head), *entries], KEY.public_key(), trusted=old)
    assert not report.ok and "rewritten" in report.problems[0].message


def test_entry_bodies_are_canonical_json():
    record = Record("t", CALL, 1, "/m", "OK", attributes={"b": "é", "a": "\x00"}, actors=("x",))
    body = encode(record, 3)
    assert body == canonical_json(json.loads(body)) and body.isascii()


def _fields(record, index):
    """What a body must hold: every field of the record under its documented key."""
    fields = {
        "actors": list(record.actors),
        "attributes": dict(record.attributes),
        "index": index,
        "log": log_id(record.tenant_id),
        "v": 1,
        **{
            name: getattr(record, name)
            for name in [
                "audit_class",
                "code",
                "event_type",
                "idempotency_key",
                "kind",
                "latency_us",
                "method",
                "occurred_at_ms",
                "peer",
                "reason",
                "replayed",
                "request_digest",
                "request_id",
                "resource",
                "session_id",
                "subject",
                "subject_type",
                "time_ms",
            ]
        },
    }
    if record.data_subject:
        fields["personal"] = {"ciphertext": record.personal, "subject": record.data_subject}
    return fields


_text = st.text(st.characters(codec="utf-8") | st.sampled_from('\x00\x1f"\\\u2028é\U0001f600'))


@settings(max_examples=300, deadline=None)
@given(
    record=st.builds(
        Record,
        tenant_id=_text,
        kind=st.sampled_from(["call", "event", "gap"]),
        time_ms=st.integers(0, 2**53),
        method=_text,
        code=_text,
        reason=_text,
        subject=_text,
        subject_type=_text,
        actors=st.lists(_text, max_size=3).map(tuple),
        session_id=_text,
        request_id=_text,
        idempotency_key=_text,
        replayed=st.booleans(),
        request_digest=_text,
        peer=_text,
        latency_us=st.integers(0, 2**40),
        resource=_text,
        event_type=_text,
        attributes=st.dictionaries(_text, _text, max_size=4),
        audit_class=st.sampled_from(["access", "security"]),
        occurred_at_ms=st.integers(0, 2**53),
        data_subject=_text,
        personal=_text,
    ),
    index=st.integers(0, 2**40),
)
def test_a_body_holds_exactly_the_record_canonically(record, index):
    body = encode(record, index)
    assert json.loads(body) == _fields(record, index)
    assert body == canonical_json(_fields(record, index)) and body.isascii()


@settings(max_examples=100, deadline=None)
@given(
    shared=st.lists(st.sampled_from(["a", "b", "é"]), min_size=1, max_size=8),
    resources=st.lists(_text, min_size=8, max_size=8),
)
def test_bodies_of_a_run_are_those_of_each_record(shared, resources):
    """encode_all writes the shared JSON once per run: the same bodies as encode, whether
    neighbours share their call's fields or not."""
    records = [
        Record("t", CALL, 1, f"/m{s}", "OK", subject=s, resource=r, attributes={"k": r})
        for s, r in zip(shared, resources, strict=False)
    ]
    assert encode_all(records, 7) == [encode(r, 7 + i) for i, r in enumerate(records)]


def followed(n=10, cut=6, rewrite=False):
    """A followed export: a checkpoint at `cut` with its entries, then one at `n` (with the
    consistency proof from `cut`) and the rest; `rewrite` signs the second over other leaves."""
    bodies = [encode(Record("t", CALL, 1, f"/m{i}", "OK"), i) for i in range(n)]
    tree = merkle.MemoryTree(merkle.leaf_hash(b) for b in bodies)
    second_bodies = list(bodies)
    if rewrite:
        second_bodies[1] = encode(Record("t", CALL, 1, "/rewritten", "OK"), 1)
    second = merkle.MemoryTree(merkle.leaf_hash(b) for b in second_bodies)

    def head(size, root, **extra):
        signed = merkle.sign_checkpoint(merkle.Checkpoint(LOG, size, root, 5), KEY.sign, "kid.1")
        return json.dumps({"type": "checkpoint", **extra, **signed.to_dict()})

    def entry(i, source, size):
        proof = [_b64(h) for h in source.inclusion_proof(i, size)]
        body = second_bodies[i] if source is second else bodies[i]
        return json.dumps({"type": "entry", "index": i, "proof": proof, "body": body.decode()})

    consistency = [_b64(h) for h in second.consistency_proof(cut, n)]
    lines = [head(cut, tree.root_at(cut), start_index=0, complete=True)]
    lines += [entry(i, tree, cut) for i in range(cut)]
    lines.append(head(n, second.root(), start_index=cut, complete=False, consistency=consistency))
    lines += [entry(i, second, n) for i in range(cut, n)]
    return lines


def test_a_followed_export_verifies_across_its_checkpoints():
    lines = followed()
    found, report = indexes(lines)
    assert found == set() and report.ok and report.entries == 10
    assert report.checkpoint is not None and report.checkpoint.checkpoint.size == 10


def test_a_followed_export_must_extend_each_checkpoint():
    _, report = indexes(followed(rewrite=True))
    assert not report.ok and any("does not extend" in p.message for p in report.problems)
    lines = followed()
    later = json.loads(lines[7])
    later["start_index"] = 3  # claims to continue from elsewhere
    lines[7] = json.dumps(later)
    _, report = indexes(lines)
    assert any("start_index" in p.message for p in report.problems)
    lines = followed()
    del lines[9]  # entry 7 of the second segment
    assert indexes(lines)[0] == {7}


def test_a_partial_export_must_hold_every_index_from_its_start():
    lines, _ = build()
    head = json.loads(lines[0])
    head.update(start_index=4, complete=False)
    partial = [json.dumps(head), *lines[5:]]
    assert indexes(partial)[1].ok
    del partial[3]  # entry 6
    assert indexes(partial)[0] == {6}
