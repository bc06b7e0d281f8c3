-- Auth: principals (users, agents, service accounts), auth sessions and refresh tokens.
-- Secrets are never stored: passwords as argon2id hashes, refresh tokens as SHA-256 digests.

CREATE TABLE principals (
    id            uuid PRIMARY KEY,
    tenant_id     text NOT NULL REFERENCES tenants (id),
    type          text NOT NULL CHECK (type IN ('user', 'agent', 'service_account')),
    email         text,
    display_name  text NOT NULL DEFAULT '',
    password_hash text,
    roles         text[] NOT NULL DEFAULT '{}',
    scopes        text[],
    owner_id      uuid REFERENCES principals (id),
    purpose       text NOT NULL DEFAULT '',
    expires_at    timestamptz,
    disabled      boolean NOT NULL DEFAULT false,
    last_seen_at  timestamptz,
    revision      bigint NOT NULL DEFAULT 1,
    request_id    text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, request_id)
);
CREATE UNIQUE INDEX principals_email ON principals (tenant_id, lower(email))
    WHERE email IS NOT NULL;

CREATE TABLE auth_sessions (
    id              uuid PRIMARY KEY,
    tenant_id       text NOT NULL,
    principal_id    uuid NOT NULL REFERENCES principals (id) ON DELETE CASCADE,
    created_at      timestamptz NOT NULL,
    expires_at      timestamptz NOT NULL,
    last_refresh_at timestamptz,
    revoked_at      timestamptz
);
CREATE INDEX auth_sessions_principal ON auth_sessions (tenant_id, principal_id)
    WHERE revoked_at IS NULL;

CREATE TABLE refresh_tokens (
    token_hash bytea PRIMARY KEY,
    session_id uuid NOT NULL REFERENCES auth_sessions (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    used_at    timestamptz
);

-- API keys: `tp_<env>_<id>_<secret><checksum>`. Only an HMAC-SHA-256 of the secret is stored,
-- under a MAC key of the Crypto keyring (`mac_version` says which version), never the secret.
CREATE TABLE api_keys (
    id           text PRIMARY KEY,
    tenant_id    text NOT NULL,
    principal_id uuid NOT NULL REFERENCES principals (id) ON DELETE CASCADE,
    mac          bytea NOT NULL,
    mac_version  integer NOT NULL,
    scopes       text[],
    display_name text NOT NULL DEFAULT '',
    expires_at   timestamptz NOT NULL,
    created_at   timestamptz NOT NULL,
    revoked_at   timestamptz,
    last_used_at timestamptz,
    request_id   text,
    UNIQUE (tenant_id, request_id)
);
CREATE INDEX api_keys_principal ON api_keys (tenant_id, principal_id);

-- TOTP MFA: the shared secret is encrypted with the Crypto keyring (`_system/auth-mfa`,
-- associated data = the principal id), never stored in the clear; recovery codes as SHA-256.
ALTER TABLE principals
    ADD COLUMN mfa_secret  bytea,
    ADD COLUMN mfa_pending bytea,
    ADD COLUMN mfa_enabled boolean NOT NULL DEFAULT false;

CREATE TABLE mfa_recovery_codes (
    principal_id uuid NOT NULL REFERENCES principals (id) ON DELETE CASCADE,
    code_hash    bytea NOT NULL,
    used_at      timestamptz,
    PRIMARY KEY (principal_id, code_hash)
);

-- Invitations: a single-use, expiring token (stored as SHA-256) that creates a user.
CREATE TABLE invitations (
    id          uuid PRIMARY KEY,
    tenant_id   text NOT NULL REFERENCES tenants (id),
    email       text NOT NULL,
    role        text NOT NULL,
    token_hash  bytea NOT NULL UNIQUE,
    invited_by  uuid NOT NULL REFERENCES principals (id),
    created_at  timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL,
    accepted_at timestamptz,
    revoked_at  timestamptz,
    request_id  text,
    UNIQUE (tenant_id, request_id)
);
