use super::*;

#[test]
fn a_query_string_with_ddl_and_dml_is_two_statements() {
    assert_eq!(statements("ALTER TABLE t ADD c int; INSERT INTO t VALUES (1)"), ["ALTER TABLE t ADD c int", "INSERT INTO t VALUES (1)"]);
    assert_eq!(statements("  ALTER TABLE t ADD c int ;\n"), ["ALTER TABLE t ADD c int"]);
}

#[test]
fn semicolons_in_strings_names_dollar_quotes_and_comments_end_nothing() {
    let sql = r#"COMMENT ON TABLE "a;b" IS 'x;''y'; ALTER TABLE t ADD c text DEFAULT $q$;$q$ /* ; */ -- ;
; SELECT 2"#;
    assert_eq!(statements(sql), [r#"COMMENT ON TABLE "a;b" IS 'x;''y'"#, "ALTER TABLE t ADD c text DEFAULT $q$;$q$", "SELECT 2"]);
    // A doubled quote inside a quoted name.
    assert_eq!(statements(r#"CREATE TABLE "x"";y" (a int); SELECT 1"#), [r#"CREATE TABLE "x"";y" (a int)"#, "SELECT 1"]);
    // U&'…' and U&"…" are read like their plain forms.
    assert_eq!(statements(r#"SELECT U&'d\0061;t', U&"a;b"; SELECT 2"#), [r#"SELECT U&'d\0061;t', U&"a;b""#, "SELECT 2"]);
    // A dollar quote ends only at its own tag.
    assert_eq!(statements("SELECT $a$ $b$; $$ ; $a$; SELECT 2"), ["SELECT $a$ $b$; $$ ; $a$", "SELECT 2"]);
}

#[test]
fn block_comments_nest() {
    assert_eq!(statements("/* outer /* inner; */ still comment; */ SELECT 1; SELECT /*/ ; */ 2"), ["SELECT 1", "SELECT /*/ ; */ 2"]);
}

#[test]
fn backslash_escapes_only_in_e_strings() {
    assert_eq!(statements(r"SELECT E'it\'s; still', e'\\'; SELECT 2"), [r"SELECT E'it\'s; still', e'\\'", "SELECT 2"]);
    // In a standard string a backslash is a character: the string ends at `\'`.
    assert_eq!(statements(r"SELECT 'a\'; SELECT 2"), [r"SELECT 'a\'", "SELECT 2"]);
    // An identifier ending in e before a quote does not make an E string.
    assert_eq!(statements(r"SELECT name'a\'; SELECT 2"), [r"SELECT name'a\'", "SELECT 2"]);
}

#[test]
fn a_parameter_or_a_dollar_inside_a_name_is_no_dollar_quote() {
    assert_eq!(statements("PREPARE p AS SELECT $1; SELECT $$;$$"), ["PREPARE p AS SELECT $1", "SELECT $$;$$"]);
    assert_eq!(statements("SELECT $1$; SELECT 2"), ["SELECT $1$", "SELECT 2"]);
    assert_eq!(statements("SELECT a$b$; SELECT 2 $"), ["SELECT a$b$", "SELECT 2 $"]);
}

#[test]
fn a_plpgsql_body_in_dollar_quotes_is_one_statement() {
    let sql = "CREATE OR REPLACE FUNCTION f() RETURNS trigger LANGUAGE plpgsql AS $body$
BEGIN
  IF NEW.a IS NULL THEN NEW.a := 1; END IF;
  RETURN NEW;
END
$body$;
CREATE TRIGGER tr BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION f();";
    let got = statements(sql);
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got[0].starts_with("CREATE OR REPLACE FUNCTION") && got[0].ends_with("$body$"));
    assert_eq!(got[1], "CREATE TRIGGER tr BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION f()");
}

#[test]
fn a_begin_atomic_body_keeps_its_semicolons() {
    let function = "CREATE FUNCTION f(a int) RETURNS int LANGUAGE sql BEGIN ATOMIC
  INSERT INTO log VALUES (a);
  SELECT a + 1;
END";
    assert_eq!(statements(&format!("{function};\nDELETE FROM t")), [function, "DELETE FROM t"]);
    let procedure = "create or replace procedure p() begin atomic select case when true then 1 else 2 end; select 3; end";
    assert_eq!(statements(&format!("{procedure}; SELECT 4")), [procedure, "SELECT 4"]);
    // A parameter named begin, in parentheses, opens no body.
    assert_eq!(
        statements("CREATE FUNCTION g(begin int) RETURNS int RETURN 1; SELECT 2"),
        ["CREATE FUNCTION g(begin int) RETURNS int RETURN 1", "SELECT 2"]
    );
    // Only BEGIN ATOMIC opens a body, comments allowed between; names
    // (after `.` or AS) are no keywords: psql would read each of these
    // as one statement, hiding the second.
    assert_eq!(
        statements("CREATE FUNCTION begin() RETURNS int LANGUAGE sql AS 'select 1'; DELETE FROM t"),
        ["CREATE FUNCTION begin() RETURNS int LANGUAGE sql AS 'select 1'", "DELETE FROM t"]
    );
    let names = "CREATE FUNCTION k() RETURNS int BEGIN ATOMIC SELECT x.begin, x.end, 1 AS case FROM x; END";
    assert_eq!(statements(&format!("{names}; DELETE FROM t")), [names, "DELETE FROM t"]);
    let comment = "CREATE FUNCTION n() RETURNS int BEGIN /* ; */ ATOMIC SELECT 1; END";
    assert_eq!(statements(&format!("{comment}; DELETE FROM t")), [comment, "DELETE FROM t"]);
    // CASE … END outside a body, and BEGIN outside a routine, count nothing.
    assert_eq!(statements("CREATE FUNCTION h() RETURNS int RETURN CASE WHEN true THEN 1 END; SELECT 2").len(), 2);
    assert_eq!(statements("BEGIN; CREATE TABLE t (a int); COMMIT"), ["BEGIN", "CREATE TABLE t (a int)", "COMMIT"]);
    assert_eq!(statements("CREATE TABLE beginning (a int); SELECT 1").len(), 2);
}

#[test]
fn semicolons_inside_parentheses_end_nothing() {
    let rule = "CREATE RULE r AS ON INSERT TO t DO ALSO (INSERT INTO a VALUES (1); INSERT INTO b VALUES (2))";
    assert_eq!(statements(&format!("{rule}; SELECT 1")), [rule, "SELECT 1"]);
}

#[test]
fn empty_and_comment_only_statements_are_left_out() {
    assert!(statements("").is_empty());
    assert!(statements(" ;; \n ; -- nothing\n /* nor here */ ;").is_empty());
    assert_eq!(statements("-- why\nALTER TABLE t ADD c int -- trailing\n; /* done */"), ["ALTER TABLE t ADD c int"]);
    assert_eq!(statements("SELECT 1 /* unterminated ; comment"), ["SELECT 1"]);
}

#[test]
fn the_last_statement_needs_no_semicolon() {
    assert_eq!(statements("SELECT 1; SELECT 2"), ["SELECT 1", "SELECT 2"]);
    assert_eq!(statements("SELECT 1"), ["SELECT 1"]);
}

#[test]
fn multi_byte_text_around_separators() {
    assert_eq!(
        statements("COMMENT ON TABLE é IS '日本;語';日本 ;\u{a0}é;'é'"),
        ["COMMENT ON TABLE é IS '日本;語'", "日本", "\u{a0}é", "'é'"]
    );
    assert_eq!(statements("SELECT $日$;$日$;é"), ["SELECT $日$;$日$", "é"]);
}

#[test]
fn an_unterminated_quote_runs_to_the_end() {
    assert_eq!(statements("SELECT 1; SELECT 'a; b"), ["SELECT 1", "SELECT 'a; b"]);
    assert_eq!(statements(r#"SELECT "a; b"#), [r#"SELECT "a; b"#]);
    assert_eq!(statements("SELECT $x$ a; b"), ["SELECT $x$ a; b"]);
    assert_eq!(statements(r"SELECT E'\"), [r"SELECT E'\"]);
    assert_eq!(
        statements("CREATE PROCEDURE p() BEGIN ATOMIC SELECT 1; SELECT 2"),
        ["CREATE PROCEDURE p() BEGIN ATOMIC SELECT 1; SELECT 2"]
    );
}

#[test]
fn joined_single_statements_come_back() {
    let singles = [
        "ALTER TABLE t ADD c int",
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; SELECT CASE WHEN true THEN 2 END; END",
        "CREATE FUNCTION g() RETURNS void AS $$ BEGIN PERFORM 1; END $$ LANGUAGE plpgsql",
        r#"COMMENT ON COLUMN "t;"."c" IS E'\'; -- ''; /*'"#,
        "CREATE RULE r AS ON DELETE TO t DO INSTEAD (DELETE FROM a; DELETE FROM b)",
        "INSERT INTO \"日本\" VALUES ('é;', $1, $tag$ $$ ; $tag$)",
        "CREATE INDEX CONCURRENTLY i ON t (a)",
        "DROP TABLE a$b$",
    ];
    let separators = [";\n", ";", " ; ", ";/* ; */", ";-- ;\n", ";\n;\n"];
    for separator in separators {
        let joined = singles.join(separator);
        assert_eq!(statements(&joined), singles, "joined with {separator:?}");
        // Any prefix, cut anywhere, is read without a panic, and its
        // statements are pieces of it.
        for (at, _) in joined.char_indices() {
            let prefix = &joined[..at];
            for s in statements(prefix) {
                assert!(prefix.contains(s));
                let _ = without_concurrently(s);
            }
        }
    }
}

#[test]
fn concurrently_is_removed_from_create_and_drop_index() {
    for (given, wanted) in [
        ("CREATE INDEX CONCURRENTLY i ON t (a)", "CREATE INDEX i ON t (a)"),
        ("create unique index concurrently if not exists i on t (a)", "create unique index if not exists i on t (a)"),
        ("CREATE INDEX concurrently ON t (a)", "CREATE INDEX ON t (a)"),
        ("DROP INDEX CONCURRENTLY IF EXISTS i", "DROP INDEX IF EXISTS i"),
        ("drop index concurrently s.i", "drop index s.i"),
        ("CREATE /* x */ INDEX -- y\n CONCURRENTLY\ti ON t (a)", "CREATE /* x */ INDEX -- y\n i ON t (a)"),
        ("CREATE INDEX CONCURRENTLY\"i\" ON t (a)", "CREATE INDEX\"i\" ON t (a)"),
        ("CREATE INDEX/**/CONCURRENTLY/**/i ON t (a)", "CREATE INDEX/**//**/i ON t (a)"),
        // The whitespace before it ends a `--` comment: it stays.
        ("CREATE INDEX --c\nCONCURRENTLY\"i\" ON t (a)", "CREATE INDEX --c\n\"i\" ON t (a)"),
        ("  CREATE UNIQUE INDEX CONCURRENTLY i ON t USING btree (\"é\")", "  CREATE UNIQUE INDEX i ON t USING btree (\"é\")"),
    ] {
        assert_eq!(without_concurrently(given), wanted, "{given}");
        assert!(matches!(without_concurrently(given), Cow::Owned(_)));
    }
}

#[test]
fn other_statements_are_unchanged() {
    for same in [
        r#"CREATE INDEX "concurrently" ON t (a)"#,
        "CREATE INDEX i ON t (concurrently)",
        "COMMENT ON TABLE t IS 'CREATE INDEX CONCURRENTLY i ON t (a)'",
        "CREATE TABLE concurrently (a int)",
        "REINDEX INDEX CONCURRENTLY i",
        "-- CREATE INDEX CONCURRENTLY\nSELECT 1",
        "CREATE INDEXES CONCURRENTLY",
        "",
    ] {
        assert!(matches!(without_concurrently(same), Cow::Borrowed(s) if s == same), "{same}");
    }
}

#[test]
fn first_keywords_and_owner_changes() {
    assert_eq!(first_keyword("/* c */ -- x\n alter table t add c int").as_deref(), Some("ALTER"));
    assert_eq!(first_keyword("\"quoted\" x"), None);
    assert_eq!(first_keyword(""), None);
    assert!(changes_owner("ALTER TABLE t OWNER TO bob"));
    assert!(changes_owner("alter function f(int) owner to \"Bob\""));
    assert!(!changes_owner("ALTER TABLE t OWNER TO bob, ADD COLUMN c int"), "another action beside it");
    assert!(!changes_owner("ALTER TABLE t RENAME owner TO holder"), "a column called owner");
    assert!(!changes_owner("ALTER TABLE t RENAME COLUMN owner TO holder"));
    assert!(!changes_owner("ALTER TABLE t RENAME CONSTRAINT owner TO c"));
    assert!(!changes_owner("CREATE TABLE owner (to_ int)"));
    assert!(!changes_owner("COMMENT ON TABLE t IS 'OWNER TO bob'"));
}
