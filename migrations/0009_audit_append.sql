-- One round trip for a group commit whose log size the writer already knows (the common case:
-- this process wrote the log last and kept its right edge). Under the log's advisory lock the
-- function reads the size and looks for the batch; it appends only if the size is the one the
-- caller hashed against, so a log another process grew since is left untouched ('moved': the
-- caller falls back to reading the size and edge under the lock). 'stored': an earlier attempt
-- of this batch committed (its answer was lost); 'appended': done, the value is the first index.
-- VOLATILE, so each statement after the lock takes a fresh snapshot and sees every commit made
-- before the lock was granted (READ COMMITTED).
CREATE FUNCTION audit_append(
    p_tenant text, p_expected bigint, p_batch bytea,
    p_recorded timestamptz[], p_kind text[], p_method text[], p_code text[], p_subject text[],
    p_actor text[], p_session text[], p_resource text[], p_data_subject text[], p_body text[],
    p_actors text[],  -- each a JSON array of the entry's delegation chain
    p_levels smallint[], p_node_idx bigint[], p_hashes bytea[]
) RETURNS TABLE (outcome text, value bigint)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_size bigint;
    v_stored bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(1635083380, hashtext(p_tenant));  -- 'audt', as the writer
    SELECT l.size INTO v_size FROM audit_logs l WHERE l.tenant_id = p_tenant;
    SELECT e.idx INTO v_stored FROM audit_entries e
        WHERE e.tenant_id = p_tenant AND e.batch = p_batch;
    IF v_stored IS NOT NULL THEN
        RETURN QUERY SELECT 'stored'::text, v_stored;
        RETURN;
    END IF;
    IF COALESCE(v_size, 0) <> p_expected THEN
        RETURN QUERY SELECT 'moved'::text, COALESCE(v_size, 0);
        RETURN;
    END IF;
    INSERT INTO audit_entries (tenant_id, idx, recorded_at, kind, method, code, subject, actor,
                               session_id, resource, data_subject, body, batch, actors)
    SELECT p_tenant, p_expected + u.n - 1, u.r, u.k, u.m, u.c, u.s, u.a, u.se, u.re, u.ds, u.b,
           CASE WHEN u.n = 1 THEN p_batch END,
           ARRAY(SELECT jsonb_array_elements_text(u.ac::jsonb))
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
