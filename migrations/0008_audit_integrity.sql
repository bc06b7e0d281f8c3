-- Audit: the integrity fixes of the review of issue 6 (docs/audit.md).

-- Retention removes entry bodies from the start of each log only, so the bodiless entries are
-- always a prefix (the offline verifier reports any other bodiless entry as tampering).
-- `expired` is where that prefix ends: the next retention run starts there.
ALTER TABLE audit_logs ADD COLUMN expired bigint NOT NULL DEFAULT 0 CHECK (expired >= 0);
