-- Tenants (workspaces): the root of every resource's scope. Every other table carries a
-- tenant_id referencing this one, and every query filters on it.
CREATE TABLE tenants (
    id           uuid PRIMARY KEY,
    name         text NOT NULL UNIQUE CHECK (name ~ '^[a-z][a-z0-9-]{1,62}$'),
    display_name text NOT NULL DEFAULT '',
    settings     jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
