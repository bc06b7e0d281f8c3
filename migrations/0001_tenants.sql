-- Tenants (workspaces): the root of every resource's scope. Every other table carries a
-- tenant_id and every query filters on it. Ids are text: tenants may also be named by a
-- trusted external issuer's claim (docs/authentication.md), not only created here.
CREATE TABLE tenants (
    id           text PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 128),
    name         text NOT NULL UNIQUE CHECK (name ~ '^[a-z][a-z0-9-]{1,62}$'),
    display_name text NOT NULL DEFAULT '',
    settings     jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
