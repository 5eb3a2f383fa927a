//! The extension's SQL objects that are plain SQL.

pgrx::extension_sql!(
    r#"
COMMENT ON SCHEMA decant IS 'decant: change capture for zero-downtime PostgreSQL migration';

-- Keeps a decant slot moving on an idle or low-traffic database: a
-- non-transactional logical message goes through every slot, so the
-- consumer sees WAL progress and can confirm it, and the source can recycle
-- WAL. Returns the message's LSN.
CREATE FUNCTION decant.heartbeat() RETURNS pg_lsn
LANGUAGE sql VOLATILE
AS $$ SELECT pg_logical_emit_message(false, 'decant.heartbeat', now()::text) $$;
"#,
    name = "decant_sql",
);

pgrx::extension_sql!(
    r#"
-- It writes WAL: only for roles it is granted to (the agent's, if it is not
-- a superuser: GRANT USAGE ON SCHEMA decant and GRANT EXECUTE ON FUNCTION
-- decant.log_standby_snapshot() TO ...).
REVOKE ALL ON FUNCTION decant.log_standby_snapshot() FROM PUBLIC;
"#,
    name = "decant_sql_privileges",
    requires = [log_standby_snapshot],
);

// The DDL capture: event triggers and the functions they call (the same
// file that `decant ddl-capture-sql` prints for servers without the
// extension). decant.ddl_statement(text) is called by name, at run time.
pgrx::extension_sql_file!("../sql/ddl_capture.sql", name = "ddl_capture", requires = ["decant_sql"]);
