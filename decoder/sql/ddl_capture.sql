-- decant's DDL capture: two event triggers that write each DDL statement of
-- the source into the WAL as a transactional logical message with prefix
-- 'decant.ddl', so that it is decoded at its place among its transaction's
-- changes, and applied there on the destination.
--
-- The extension (CREATE EXTENSION decant) installs this file together with
-- decant.ddl_statement(text), which cuts the running statement out of a
-- client's query string. Without the extension (`decant ddl-capture-sql`
-- prints this file for servers where it cannot be installed) the whole
-- query string is sent, and the applier replays it only when it holds a
-- single statement. Idempotent: it can be run again.
--
-- The message is JSON, converted to UTF-8:
--   {"v": 1, "tag": <command tag>, "origin": "statement" | "query" | "generated" | "function",
--    "statement": <text, or null for "function">, "search_path": <the session's>,
--    "objects": [{"type", "schema", "name", "table", "identity"}, ...], "error": <text, on a capture failure>}
-- "function": the DDL ran inside a function, DO block or procedure; its text
-- cannot be replayed without the rest of what that code did.

-- The name by which a task's table selection matches an object: its own
-- name for tables, views, sequences, functions and types, and the table it
-- belongs to for indexes, constraints, triggers, rules, policies, defaults
-- and owned sequences (in `table`). Parameters are used by number: in a SQL
-- function a column of the same name would win over them.
CREATE OR REPLACE FUNCTION decant.ddl_object_names(classid oid, objid oid, OUT name text, OUT "table" text)
LANGUAGE sql STABLE
AS $$
  SELECT CASE $1
           WHEN 'pg_class'::regclass THEN (SELECT c.relname::text FROM pg_class c WHERE c.oid = $2)
           WHEN 'pg_proc'::regclass THEN (SELECT p.proname::text FROM pg_proc p WHERE p.oid = $2)
           WHEN 'pg_type'::regclass THEN (SELECT t.typname::text FROM pg_type t WHERE t.oid = $2)
         END,
         CASE $1
           WHEN 'pg_class'::regclass THEN (
             SELECT coalesce(ti.relname, ts.relname)::text
               FROM pg_class c
               LEFT JOIN pg_index i ON i.indexrelid = c.oid
               LEFT JOIN pg_class ti ON ti.oid = i.indrelid
               LEFT JOIN pg_depend d ON c.relkind = 'S' AND d.classid = 'pg_class'::regclass AND d.objid = c.oid
                                    AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
               LEFT JOIN pg_class ts ON ts.oid = d.refobjid
              WHERE c.oid = $2 LIMIT 1)
           WHEN 'pg_constraint'::regclass THEN (
             SELECT coalesce(t.relname, y.typname)::text FROM pg_constraint k
               LEFT JOIN pg_class t ON t.oid = k.conrelid LEFT JOIN pg_type y ON y.oid = k.contypid WHERE k.oid = $2)
           WHEN 'pg_trigger'::regclass THEN (
             SELECT t.relname::text FROM pg_trigger g JOIN pg_class t ON t.oid = g.tgrelid WHERE g.oid = $2)
           WHEN 'pg_rewrite'::regclass THEN (
             SELECT t.relname::text FROM pg_rewrite r JOIN pg_class t ON t.oid = r.ev_class WHERE r.oid = $2)
           WHEN 'pg_policy'::regclass THEN (
             SELECT t.relname::text FROM pg_policy p JOIN pg_class t ON t.oid = p.polrelid WHERE p.oid = $2)
           WHEN 'pg_attrdef'::regclass THEN (
             SELECT t.relname::text FROM pg_attrdef a JOIN pg_class t ON t.oid = a.adrelid WHERE a.oid = $2)
         END
$$;

-- sql_drop fires before ddl_command_end and is the only place that lists
-- what a statement dropped; the list waits in a transaction-local setting
-- for ddl_command_end, which sends one message per statement.
CREATE OR REPLACE FUNCTION decant.capture_drop() RETURNS event_trigger
LANGUAGE plpgsql
AS $$
BEGIN
  PERFORM pg_catalog.set_config('decant.ddl_dropped', (
    SELECT coalesce(nullif(pg_catalog.current_setting('decant.ddl_dropped', true), '')::jsonb, '[]'::jsonb)
           || coalesce(jsonb_agg(jsonb_build_object('type', lower(d.object_type), 'schema', d.schema_name,
                                                    'name', d.object_name, 'identity', d.object_identity)), '[]'::jsonb)
      FROM pg_catalog.pg_event_trigger_dropped_objects() d
     WHERE NOT d.is_temporary)::text, true);
EXCEPTION WHEN OTHERS THEN
  -- Capture never fails the user's statement; ddl_command_end reports it.
  PERFORM pg_catalog.set_config('decant.ddl_drop_error', SQLERRM, true);
END
$$;

-- What the DDL is and where it ran is read in the user's session; the
-- message is built and written by decant.emit_ddl, which runs as the
-- extension's owner (writing a logical message, reading the catalogs and
-- decant's functions need privileges a user doing DDL may not have).
CREATE OR REPLACE FUNCTION decant.capture_ddl() RETURNS event_trigger
LANGUAGE plpgsql
AS $$
DECLARE
  stack text;
BEGIN
  -- Owners, privileges, security labels, publications and subscriptions
  -- are not migrated (decant's schema steps leave them out too).
  IF tg_tag IN ('GRANT', 'REVOKE', 'ALTER DEFAULT PRIVILEGES', 'SECURITY LABEL', 'CREATE PUBLICATION', 'ALTER PUBLICATION',
                'DROP PUBLICATION', 'CREATE SUBSCRIPTION', 'ALTER SUBSCRIPTION', 'DROP SUBSCRIPTION') THEN
    PERFORM pg_catalog.set_config('decant.ddl_dropped', '', true);
    RETURN;
  END IF;
  -- Called from a function, a DO block or a procedure, the error context
  -- has a line for each caller besides this function's own.
  GET DIAGNOSTICS stack = PG_CONTEXT;
  PERFORM decant.emit_ddl(tg_tag, pg_catalog.current_setting('search_path'), pg_catalog.strpos(stack, E'\n') > 0);
END
$$;

CREATE OR REPLACE FUNCTION decant.emit_ddl(tag text, search_path text, nested boolean) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  dropped text := coalesce(current_setting('decant.ddl_dropped', true), '');
  drop_error text := nullif(current_setting('decant.ddl_drop_error', true), '');
  objects jsonb;
  statement text;
  origin text;
  content bytea;
BEGIN
  -- Outside an event trigger this raises: the function writes nothing
  -- when called directly.
  PERFORM FROM pg_event_trigger_ddl_commands() LIMIT 1;
  PERFORM set_config('decant.ddl_dropped', '', true);
  PERFORM set_config('decant.ddl_drop_error', '', true);
  BEGIN
    IF drop_error IS NOT NULL THEN
      RAISE EXCEPTION 'listing the dropped objects failed: %', drop_error;
    END IF;
    SELECT coalesce(jsonb_agg(jsonb_build_object('type', lower(c.object_type), 'schema', c.schema_name, 'name', n.name,
                                                 'table', n."table", 'identity', c.object_identity)), '[]'::jsonb)
      INTO objects
      FROM pg_event_trigger_ddl_commands() c
      LEFT JOIN LATERAL decant.ddl_object_names(c.classid, c.objid) n ON true
     WHERE NOT c.in_extension;
    IF dropped <> '' THEN
      objects := objects || dropped::jsonb;
    END IF;
    -- Temporary objects, TOAST tables and decant's own objects (its schema,
    -- the extension) are not the user's schema.
    SELECT coalesce(jsonb_agg(o), '[]'::jsonb) INTO objects
      FROM jsonb_array_elements(objects) o
     WHERE coalesce(o->>'schema', '') <> 'decant' AND coalesce(o->>'schema', '') NOT LIKE 'pg\_temp%'
       AND coalesce(o->>'schema', '') NOT LIKE 'pg\_toast%'
       AND NOT (o->>'type' = 'extension' AND o->>'identity' = 'decant');
    IF objects = '[]'::jsonb THEN
      RETURN;
    END IF;
    IF tag = 'REFRESH MATERIALIZED VIEW' THEN
      -- Computed again from the destination's tables, which hold at this
      -- place what the source's held: the same rows, wherever the refresh
      -- ran (maintenance procedures do it), and without CONCURRENTLY,
      -- which needs no transaction of its own on the destination.
      origin := 'generated';
      SELECT format('REFRESH MATERIALIZED VIEW %I.%I%s', ns.nspname, c.relname,
                    CASE WHEN c.relispopulated THEN '' ELSE ' WITH NO DATA' END)
        INTO statement
        FROM pg_event_trigger_ddl_commands() e
        JOIN pg_class c ON c.oid = e.objid AND e.classid = 'pg_class'::regclass
        JOIN pg_namespace ns ON ns.oid = c.relnamespace
       LIMIT 1;
    ELSIF nested THEN
      origin := 'function';
    ELSIF tag IN ('CREATE TABLE AS', 'SELECT INTO') THEN
      -- Its rows reach the destination as the stream's INSERTs, decoded
      -- before this message (the applier creates the table from their
      -- relation metadata); replaying the query would write them a second
      -- time. Only the table is made, if it has no rows yet.
      origin := 'generated';
      SELECT format('CREATE %sTABLE IF NOT EXISTS %I.%I (%s)', CASE c.relpersistence WHEN 'u' THEN 'UNLOGGED ' ELSE '' END,
                    ns.nspname, c.relname,
                    coalesce(string_agg(format('%I %s%s', a.attname, format_type(a.atttypid, a.atttypmod),
                                               CASE WHEN a.attcollation <> t.typcollation
                                                    THEN (SELECT format(' COLLATE %I.%I', cn.nspname, co.collname)
                                                            FROM pg_collation co JOIN pg_namespace cn ON cn.oid = co.collnamespace
                                                           WHERE co.oid = a.attcollation)
                                                    ELSE '' END),
                                        ', ' ORDER BY a.attnum), ''))
        INTO statement
        FROM pg_event_trigger_ddl_commands() e
        JOIN pg_class c ON c.oid = e.objid AND e.classid = 'pg_class'::regclass
        JOIN pg_namespace ns ON ns.oid = c.relnamespace
        LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
        LEFT JOIN pg_type t ON t.oid = a.atttypid
       GROUP BY c.relpersistence, ns.nspname, c.relname;
    ELSIF to_regprocedure('decant.ddl_statement(text)') IS NOT NULL THEN
      EXECUTE 'SELECT convert_from(decant.ddl_statement($1), getdatabaseencoding())' INTO statement USING tag;
      origin := CASE WHEN statement IS NULL THEN 'function' ELSE 'statement' END;
    ELSE
      statement := current_query();
      origin := 'query';
    END IF;
    content := convert_to(jsonb_build_object(
      'v', 1, 'tag', tag, 'origin', origin, 'statement', CASE WHEN origin = 'function' THEN NULL ELSE statement END,
      'search_path', search_path, 'objects', objects)::text, 'UTF8');
  EXCEPTION WHEN OTHERS THEN
    -- Capture never fails the user's statement. The destination is told
    -- that a DDL was not captured: the task stops there with this error
    -- rather than go on without it.
    content := convert_to(jsonb_build_object(
      'v', 1, 'tag', tag, 'origin', 'error', 'error', SQLERRM, 'objects', coalesce(objects, '[]'::jsonb))::text, 'UTF8');
  END;
  -- Written outside the block above (a subtransaction of its own): a
  -- message that is the first WAL record of a subtransaction was decoded
  -- after the changes that followed it in its transaction, not at its
  -- place (seen on PostgreSQL 15).
  PERFORM pg_logical_emit_message(true, 'decant.ddl', content);
END
$$;

-- Every role's DDL is captured: each must be able to reach decant.emit_ddl.
GRANT USAGE ON SCHEMA decant TO PUBLIC;

-- CREATE TABLE AS and SELECT INTO: their rows are decoded before the
-- statement's message (ddl_command_end fires after they are written), so
-- a first message announces the statement and lets the destination create
-- the table from those rows' relation metadata when they arrive.
CREATE OR REPLACE FUNCTION decant.capture_ddl_start() RETURNS event_trigger
LANGUAGE plpgsql
AS $$
BEGIN
  PERFORM decant.emit_ddl_start(tg_tag);
END
$$;

CREATE OR REPLACE FUNCTION decant.emit_ddl_start(tag text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  PERFORM pg_logical_emit_message(true, 'decant.ddl', convert_to(
    jsonb_build_object('v', 1, 'tag', tag, 'origin', 'announce', 'objects', '[]'::jsonb)::text, 'UTF8'));
END
$$;

DROP EVENT TRIGGER IF EXISTS decant_ddl_start;
CREATE EVENT TRIGGER decant_ddl_start ON ddl_command_start WHEN TAG IN ('CREATE TABLE AS', 'SELECT INTO')
  EXECUTE PROCEDURE decant.capture_ddl_start();
DROP EVENT TRIGGER IF EXISTS decant_ddl_drop;
CREATE EVENT TRIGGER decant_ddl_drop ON sql_drop EXECUTE PROCEDURE decant.capture_drop();
DROP EVENT TRIGGER IF EXISTS decant_ddl_end;
CREATE EVENT TRIGGER decant_ddl_end ON ddl_command_end EXECUTE PROCEDURE decant.capture_ddl();
