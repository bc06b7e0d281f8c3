-- Audit: the integrity fixes of the review of issue 6 (docs/audit.md).

-- Retention removes entry bodies from the start of each log only, so the bodiless entries are
-- always a prefix (the offline verifier reports any other bodiless entry as tampering).
-- `expired` is where that prefix ends: the next retention run starts there.
ALTER TABLE audit_logs ADD COLUMN expired bigint NOT NULL DEFAULT 0 CHECK (expired >= 0);

-- Idempotent group commits: the first entry of each tenant's part of a batch carries the batch's
-- random id, so a retry after a commit whose answer was lost finds it instead of appending the
-- entries twice. Partial: only one entry per batch is indexed.
ALTER TABLE audit_entries ADD COLUMN batch bytea;
CREATE UNIQUE INDEX audit_entries_batch ON audit_entries (tenant_id, batch) WHERE batch IS NOT NULL;

-- The whole delegation chain, for ListEntries' `agent` filter (an agent anywhere in the chain,
-- or the subject). Most calls are not delegated: only non-empty chains are indexed.
ALTER TABLE audit_entries ADD COLUMN actors text[] NOT NULL DEFAULT '{}';
UPDATE audit_entries SET actors = ARRAY(SELECT jsonb_array_elements_text(body::jsonb -> 'actors'))
    WHERE body LIKE '{"actors":["%';
CREATE INDEX audit_entries_actors ON audit_entries USING gin (actors) WHERE actors <> '{}';
