-- Policy: per-tenant bundle versions (immutable, content-addressed) and the activation history.

-- One row per distinct bundle document a tenant put. `version_id` is the SHA-256 of the
-- document's canonical JSON, so the same content is one version however often it is put.
CREATE TABLE policy_bundles (
    tenant_id        text NOT NULL,
    version_id       text NOT NULL CHECK (version_id ~ '^[0-9a-f]{64}$'),
    label            text NOT NULL DEFAULT '',
    format           text NOT NULL CHECK (format IN ('yaml', 'json')),
    source           text NOT NULL,
    resource_kinds   text[] NOT NULL DEFAULT '{}',
    quotas           text[] NOT NULL DEFAULT '{}',
    test_count       integer NOT NULL DEFAULT 0,
    create_principal text NOT NULL DEFAULT '',
    created_at       timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, version_id)
);
CREATE INDEX policy_bundles_newest ON policy_bundles (tenant_id, created_at DESC, version_id);

-- The activation history, a stack: the active version is the newest activation not undone.
-- ActivateBundle pushes; RollbackBundle marks the newest live activation undone.
CREATE TABLE policy_activations (
    id               bigserial PRIMARY KEY,
    tenant_id        text NOT NULL,
    version_id       text NOT NULL,
    activated_by     text NOT NULL DEFAULT '',
    activated_at     timestamptz NOT NULL,
    undone_at        timestamptz,
    FOREIGN KEY (tenant_id, version_id) REFERENCES policy_bundles (tenant_id, version_id)
);
CREATE INDEX policy_activations_live ON policy_activations (tenant_id, id DESC)
    WHERE undone_at IS NULL;
