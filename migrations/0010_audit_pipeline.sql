-- Pipelined group commits (docs/audit.md, "Group commit"): the writer may send the next batch
-- of a log before the previous one is answered, hashed against the log as that previous batch
-- will leave it. The overload below (two more arguments than 0009's, which stays for processes
-- of the previous release) appends only if the log's size is the expected one AND the entries
-- just before it are that previous batch: `p_prev_batch` must be the batch id stored at index
-- `p_prev_first`. Batch ids are random and unique per log, so a log that reached the expected
-- size some other way (the previous batch failed and another process appended as many entries)
-- is 'moved', never appended to with hashes computed over entries it does not hold. With
-- `p_prev_batch` NULL this is 0009's function.
CREATE FUNCTION audit_append(
    p_tenant text, p_expected bigint, p_batch bytea,
    p_recorded timestamptz[], p_kind text[], p_method text[], p_code text[], p_subject text[],
    p_actor text[], p_session text[], p_resource text[], p_data_subject text[], p_body text[],
    p_actors text[],  -- each a JSON array of the entry's delegation chain
    p_levels smallint[], p_node_idx bigint[], p_hashes bytea[],
    p_prev_batch bytea, p_prev_first bigint
) RETURNS TABLE (outcome text, value bigint)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_size bigint;
    v_stored bigint;
BEGIN
    -- Sent right behind its predecessor, this call may still reach the lock first: wait
    -- (without the lock, which the predecessor needs) until that batch is stored, for at most
    -- about 100 ms (a predecessor that failed leaves this one 'moved' below).
    IF p_prev_batch IS NOT NULL THEN
        FOR i IN 1..100 LOOP
            EXIT WHEN EXISTS (SELECT 1 FROM audit_entries e
                              WHERE e.tenant_id = p_tenant AND e.batch = p_prev_batch);
            PERFORM pg_sleep(0.001);
        END LOOP;
    END IF;
    PERFORM pg_advisory_xact_lock(1635083380, hashtext(p_tenant));  -- 'audt', as the writer
    SELECT l.size INTO v_size FROM audit_logs l WHERE l.tenant_id = p_tenant;
    SELECT e.idx INTO v_stored FROM audit_entries e
        WHERE e.tenant_id = p_tenant AND e.batch = p_batch;
    IF v_stored IS NOT NULL THEN
        RETURN QUERY SELECT 'stored'::text, v_stored;
        RETURN;
    END IF;
    IF COALESCE(v_size, 0) <> p_expected OR (p_prev_batch IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM audit_entries e
        WHERE e.tenant_id = p_tenant AND e.batch = p_prev_batch AND e.idx = p_prev_first
    )) THEN
        RETURN QUERY SELECT 'moved'::text, COALESCE(v_size, 0);
        RETURN;
    END IF;
    INSERT INTO audit_entries (tenant_id, idx, recorded_at, kind, method, code, subject, actor,
                               session_id, resource, data_subject, body, batch, actors)
    SELECT p_tenant, p_expected + u.n - 1, u.r, u.k, u.m, u.c, u.s, u.a, u.se, u.re, u.ds, u.b,
           CASE WHEN u.n = 1 THEN p_batch END,
           CASE WHEN u.ac = '[]' THEN '{}'::text[]
                ELSE ARRAY(SELECT jsonb_array_elements_text(u.ac::jsonb)) END
    FROM unnest(p_recorded, p_kind, p_method, p_code, p_subject, p_actor, p_session,
                p_resource, p_data_subject, p_body, p_actors)
         WITH ORDINALITY AS u(r, k, m, c, s, a, se, re, ds, b, ac, n);
    INSERT INTO audit_nodes (tenant_id, level, idx, hash)
    SELECT p_tenant, w.l, w.i, w.h FROM unnest(p_levels, p_node_idx, p_hashes) AS w(l, i, h);
    INSERT INTO audit_logs (tenant_id, size) VALUES (p_tenant, p_expected + cardinality(p_body))
    ON CONFLICT (tenant_id) DO UPDATE SET size = EXCLUDED.size, updated_at = now();
    RETURN QUERY SELECT 'appended'::text, p_expected;
END
$$;
