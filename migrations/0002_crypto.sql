-- Crypto: tenant key-encryption keys, keys and key versions. Only wrapped material is stored.

-- One KEK per tenant, wrapped by a root key (root_key_id says which).
CREATE TABLE crypto_tenant_keks (
    tenant_id   text PRIMARY KEY,
    root_key_id text NOT NULL,
    wrapped_kek bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    rewrapped_at timestamptz
);

CREATE TABLE crypto_keys (
    id                     uuid PRIMARY KEY,
    tenant_id              text NOT NULL,
    name                   text NOT NULL CHECK (name ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    purpose                text NOT NULL,
    algorithm              text NOT NULL,
    primary_version        integer NOT NULL,
    min_decryption_version integer NOT NULL DEFAULT 1,
    rotation_period        double precision,           -- seconds; NULL: no automatic rotation
    next_rotation_at       timestamptz,
    labels                 jsonb NOT NULL DEFAULT '{}'::jsonb,
    revision               bigint NOT NULL DEFAULT 1,   -- etag source
    request_id             text,                         -- CreateKey's AIP-155 id: exactly-once
    created_at             timestamptz NOT NULL,
    updated_at             timestamptz NOT NULL,
    UNIQUE (tenant_id, name),
    UNIQUE (tenant_id, request_id)
);
CREATE INDEX crypto_keys_rotation ON crypto_keys (next_rotation_at)
    WHERE next_rotation_at IS NOT NULL;

CREATE TABLE crypto_key_versions (
    key_id           uuid NOT NULL REFERENCES crypto_keys (id) ON DELETE CASCADE,
    version          integer NOT NULL,
    state            text NOT NULL,
    wrapped_material bytea,        -- NULL once destroyed
    created_at       timestamptz NOT NULL,
    destroy_at       timestamptz,
    destroyed_at     timestamptz,
    usage            jsonb NOT NULL DEFAULT '{}'::jsonb,
    PRIMARY KEY (key_id, version)
);
CREATE INDEX crypto_key_versions_destroy ON crypto_key_versions (destroy_at)
    WHERE state = 'destroy_scheduled';
