-- Audit: one append-only Merkle log per tenant (docs/audit.md, docs/audit-format.md).

-- The size of each tenant's log; the writer holds a transaction-scoped advisory lock on the
-- tenant while it appends, so several server processes produce one consistent tree.
CREATE TABLE audit_logs (
    tenant_id  text PRIMARY KEY,
    size       bigint NOT NULL CHECK (size >= 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- One row per leaf. `body` is the exact canonical JSON the leaf hash covers (NULL once
-- retention removed it; the leaf hash stays in audit_nodes at level 0). The other columns are
-- copies of body fields, for filtering.
CREATE TABLE audit_entries (
    tenant_id   text NOT NULL,
    idx         bigint NOT NULL CHECK (idx >= 0),
    recorded_at timestamptz NOT NULL,
    kind        text NOT NULL,
    method      text NOT NULL,
    code        text NOT NULL,
    subject     text NOT NULL,
    actor       text NOT NULL,
    session_id  text NOT NULL,
    resource    text NOT NULL,
    body        text,
    PRIMARY KEY (tenant_id, idx)
);
CREATE INDEX audit_entries_time ON audit_entries (tenant_id, recorded_at);
CREATE INDEX audit_entries_subject ON audit_entries (tenant_id, subject, idx);
CREATE INDEX audit_entries_actor ON audit_entries (tenant_id, actor, idx);
CREATE INDEX audit_entries_session ON audit_entries (tenant_id, session_id, idx)
    WHERE session_id <> '';

-- Perfect-subtree hashes: (level, idx) covers leaves [idx * 2^level, (idx + 1) * 2^level).
-- Written once, when the subtree completes, in the same transaction as its last leaf.
CREATE TABLE audit_nodes (
    tenant_id text NOT NULL,
    level     smallint NOT NULL CHECK (level >= 0),
    idx       bigint NOT NULL CHECK (idx >= 0),
    hash      bytea NOT NULL CHECK (length(hash) = 32),
    PRIMARY KEY (tenant_id, level, idx)
);

-- Signed checkpoints (tree heads), newest last.
CREATE TABLE audit_checkpoints (
    tenant_id    text NOT NULL,
    size         bigint NOT NULL,
    root         bytea NOT NULL,
    timestamp_ms bigint NOT NULL,
    key_id       text NOT NULL,
    signature    bytea NOT NULL,
    PRIMARY KEY (tenant_id, size)
);
