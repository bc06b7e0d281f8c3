-- Audit: personal data under per-subject keys (crypto-shredding) and per-tenant retention
-- (docs/audit.md).

-- One row per data subject that has personal data in a tenant's log. `ref` is random: it is
-- what entries carry and what names the subject's key, so the log never holds the subject's
-- identifier. `subject_mac` (HMAC-SHA-256 of the identifier under a server key) finds the row;
-- erasure clears it, so afterwards nothing links the subject to the entries.
CREATE TABLE audit_subjects (
    tenant_id   text NOT NULL,
    ref         text NOT NULL,
    subject_mac bytea,
    created_at  timestamptz NOT NULL DEFAULT now(),
    erased_at   timestamptz,
    PRIMARY KEY (tenant_id, ref),
    CHECK ((subject_mac IS NULL) = (erased_at IS NOT NULL))
);
CREATE UNIQUE INDEX audit_subjects_mac ON audit_subjects (tenant_id, subject_mac)
    WHERE subject_mac IS NOT NULL;

ALTER TABLE audit_entries ADD COLUMN data_subject text NOT NULL DEFAULT '';
CREATE INDEX audit_entries_data_subject ON audit_entries (tenant_id, data_subject, idx)
    WHERE data_subject <> '';

-- Per-tenant settings; a tenant without a row uses the server default.
CREATE TABLE audit_settings (
    tenant_id      text PRIMARY KEY,
    retention_days integer NOT NULL CHECK (retention_days BETWEEN 1 AND 3650),
    revision       bigint NOT NULL DEFAULT 1,
    updated_at     timestamptz NOT NULL DEFAULT now()
);
