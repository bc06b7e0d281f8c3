-- Session: agent sessions with their change history, tasks (hand-offs) and approvals.
-- No foreign key to tenants: tenants of trusted external issuers exist only in their tokens.

CREATE TABLE agent_sessions (
    id                uuid PRIMARY KEY,
    tenant_id         text NOT NULL,
    agent_id          text NOT NULL,
    user_id           text,
    role              text NOT NULL DEFAULT '',
    parent_session_id uuid,
    task              text NOT NULL DEFAULT '',
    metadata          jsonb NOT NULL DEFAULT '{}'::jsonb,
    labels            text[] NOT NULL DEFAULT '{}',
    state             text NOT NULL CHECK (state IN
                          ('PENDING', 'ACTIVE', 'COMPLETED', 'FAILED', 'EXPIRED', 'CANCELLED')),
    end_reason        text NOT NULL DEFAULT '',
    created_by        text NOT NULL,
    created_at        timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL,
    started_at        timestamptz,
    ended_at          timestamptz,
    expires_at        timestamptz NOT NULL,
    -- Set once the deny-list entry for the session's delegated tokens is written; the sweeper
    -- retries ended sessions where it is still NULL (a revocation is never lost).
    tokens_revoked_at timestamptz,
    revision          bigint NOT NULL DEFAULT 1,
    request_id        text NOT NULL,
    UNIQUE (tenant_id, request_id)
);
CREATE INDEX agent_sessions_list ON agent_sessions (tenant_id, created_at DESC, id DESC);
CREATE INDEX agent_sessions_live ON agent_sessions (expires_at)
    WHERE state IN ('PENDING', 'ACTIVE');
CREATE INDEX agent_sessions_ended ON agent_sessions (ended_at) WHERE ended_at IS NOT NULL;
CREATE INDEX agent_sessions_unrevoked ON agent_sessions (ended_at)
    WHERE ended_at IS NOT NULL AND tokens_revoked_at IS NULL;

-- Every revision of every session, written in the same statement as the change: watchers
-- read from here, so pub/sub only says "look again" and a lost message loses nothing.
CREATE TABLE agent_session_events (
    session_id uuid NOT NULL REFERENCES agent_sessions (id) ON DELETE CASCADE,
    revision   bigint NOT NULL,
    snapshot   jsonb NOT NULL,
    PRIMARY KEY (session_id, revision)
);

CREATE TABLE session_tasks (
    id             uuid PRIMARY KEY,
    tenant_id      text NOT NULL,
    session_id     uuid NOT NULL REFERENCES agent_sessions (id) ON DELETE CASCADE,
    type           text NOT NULL,
    from_role      text NOT NULL,
    to_role        text NOT NULL,
    payload        jsonb NOT NULL DEFAULT '{}'::jsonb,
    trace_id       text NOT NULL DEFAULT '',
    state          text NOT NULL CHECK (state IN
                       ('PENDING', 'IN_PROGRESS', 'COMPLETED', 'FAILED', 'CANCELLED')),
    status_message text NOT NULL DEFAULT '',
    created_by     text NOT NULL,
    created_at     timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL,
    revision       bigint NOT NULL DEFAULT 1,
    request_id     text NOT NULL,
    UNIQUE (tenant_id, request_id)
);
CREATE INDEX session_tasks_session ON session_tasks (tenant_id, session_id, created_at, id);

-- The approval token is never stored, only its SHA-256.
CREATE TABLE session_approvals (
    id             uuid PRIMARY KEY,
    tenant_id      text NOT NULL,
    session_id     uuid REFERENCES agent_sessions (id) ON DELETE CASCADE,
    requester_id   text NOT NULL,
    requester_chain text[] NOT NULL,
    action_digest  bytea NOT NULL,
    action         text NOT NULL DEFAULT '',
    reason         text NOT NULL DEFAULT '',
    approver_roles text[] NOT NULL,
    state          text NOT NULL CHECK (state IN ('PENDING', 'APPROVED', 'DENIED', 'EXPIRED')),
    decided_by     text,
    decision_note  text NOT NULL DEFAULT '',
    token_hash     bytea UNIQUE,
    created_at     timestamptz NOT NULL,
    decided_at     timestamptz,
    expires_at     timestamptz NOT NULL,
    redeemed_at    timestamptz,
    revision       bigint NOT NULL DEFAULT 1,
    request_id     text NOT NULL,
    UNIQUE (tenant_id, request_id)
);
CREATE INDEX session_approvals_list ON session_approvals (tenant_id, created_at DESC, id DESC);
CREATE INDEX session_approvals_pending ON session_approvals (expires_at) WHERE state = 'PENDING';
