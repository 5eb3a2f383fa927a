//! One captured DDL statement, as the source's event trigger wrote it (a
//! JSON message, see `decoder/sql/ddl_capture.sql`): which objects it
//! touched, for the task's selection, and the text to replay.

use decant_proto::options::PluginOptions;
use serde::Deserialize;

use super::text;

#[derive(Debug, Deserialize)]
pub struct DdlCommand {
    /// The command tag (`ALTER TABLE`).
    pub tag: String,
    pub origin: Origin,
    pub statement: Option<String>,
    /// The source session's search_path, under which the text is replayed.
    #[serde(default)]
    pub search_path: Option<String>,
    #[serde(default)]
    pub objects: Vec<DdlObject>,
    /// Why the capture failed (origin `error`).
    #[serde(default)]
    pub error: Option<String>,
}

/// Where the statement's text comes from.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// Exactly the statement, cut out of the client's query string.
    Statement,
    /// The client's whole query string (the capture without the extension).
    Query,
    /// Built by the capture (CREATE TABLE AS: the table without its rows,
    /// which the stream carries).
    Generated,
    /// Run by a function, DO block or procedure: no text to replay alone.
    Function,
    /// The capture failed.
    Error,
    /// Sent as CREATE TABLE AS or SELECT INTO starts: its rows come before
    /// its own message.
    Announce,
}

#[derive(Debug, Deserialize)]
pub struct DdlObject {
    #[serde(rename = "type")]
    pub kind: String,
    pub schema: Option<String>,
    /// Its own name (tables, views, sequences, functions, types).
    pub name: Option<String>,
    /// The table it belongs to (indexes, constraints, triggers, owned sequences).
    pub table: Option<String>,
    pub identity: Option<String>,
}

/// Why a captured statement cannot be replayed as it is.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotReplayable {
    #[error("it ran inside a function, DO block or procedure: its text cannot be replayed without the rest of what that code did")]
    InFunction,
    #[error("the source could not capture it: {0}")]
    CaptureFailed(String),
    #[error(
        "the client sent it in a query string of {0} statements, and without the decant extension on the source the capture \
         cannot tell which one it was (the others may be DML, which the stream already carries)"
    )]
    SeveralStatements(usize),
    #[error("the captured text is not one {0} statement")]
    NotTheStatement(String),
}

impl DdlCommand {
    pub fn parse(content: &[u8]) -> Result<DdlCommand, String> {
        serde_json::from_slice(content).map_err(|e| format!("a decant.ddl message that is not valid: {e}"))
    }

    /// Whether the statement touches an object of the task's selection.
    /// Objects whose names are known (tables and what belongs to one,
    /// views, sequences, functions, types) decide by those names; an object
    /// outside any schema by the schema it is (a schema) or by whether the
    /// task selects everything (extensions, foreign servers, …); when no
    /// object has a name, an object in a schema selected whole. A failed
    /// capture whose objects are unknown counts as selected: the task must
    /// not go on without it unseen.
    pub fn selected(&self, selection: &PluginOptions) -> bool {
        if self.objects.is_empty() {
            return self.origin == Origin::Error;
        }
        let mut named = false;
        for o in &self.objects {
            match named_selected(o, selection) {
                Some(true) => return true,
                Some(false) => named = true,
                None => {}
            }
        }
        !named && self.objects.iter().any(|o| o.schema.as_deref().is_some_and(|s| selection.schema_selected_whole(s.as_bytes())))
    }

    /// The objects, for messages (`public.t, public.t_pkey`).
    pub fn object_list(&self) -> String {
        let mut names: Vec<&str> = self.objects.iter().filter_map(|o| o.identity.as_deref()).collect();
        names.dedup();
        names.join(", ")
    }

    /// The text to run on the destination; `Ok(None)` when the statement
    /// changes only an owner (owners are not migrated).
    pub fn replay_text(&self) -> Result<Option<String>, NotReplayable> {
        let text = match self.origin {
            Origin::Function => return Err(NotReplayable::InFunction),
            Origin::Error => return Err(NotReplayable::CaptureFailed(self.error.clone().unwrap_or_default())),
            Origin::Announce => return Ok(None),
            Origin::Statement | Origin::Query | Origin::Generated => self.statement.as_deref().unwrap_or(""),
        };
        let statements = text::statements(text);
        let [statement] = statements[..] else {
            return Err(match (self.origin, statements.len()) {
                (Origin::Query, n) if n > 1 => NotReplayable::SeveralStatements(n),
                _ => NotReplayable::NotTheStatement(self.tag.clone()),
            });
        };
        // The first word of a tag (ALTER, CREATE, DROP, COMMENT, …) is the
        // statement's: a sanity check on text that came from outside.
        let first_word = |s: &str| s.split_whitespace().next().map(str::to_ascii_uppercase);
        let tag_word = first_word(&self.tag);
        if tag_word != text::first_keyword(statement) && !(self.tag == "SELECT INTO" && self.origin == Origin::Generated) {
            return Err(NotReplayable::NotTheStatement(self.tag.clone()));
        }
        if text::changes_owner(statement) {
            return Ok(None);
        }
        Ok(Some(text::without_concurrently(statement).into_owned()))
    }
}

/// Whether a named object is selected; `None` for an object in a schema
/// whose name the capture does not know (a column default, a dropped
/// constraint).
fn named_selected(o: &DdlObject, selection: &PluginOptions) -> Option<bool> {
    let Some(schema) = o.schema.as_deref() else {
        return Some(match (o.kind.as_str(), o.identity.as_deref()) {
            ("schema", Some(name)) => selection.schema_selected_whole(name.as_bytes()),
            _ => selection.include_tables.is_empty() && selection.exclude_tables.is_empty(),
        });
    };
    let mut names = [o.name.as_deref(), o.table.as_deref()].into_iter().flatten().peekable();
    names.peek()?;
    Some(names.any(|n| selection.table_selected(schema.as_bytes(), n.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(json: &str) -> DdlCommand {
        DdlCommand::parse(json.as_bytes()).unwrap()
    }

    fn selection(include: &str, exclude: &str) -> PluginOptions {
        let mut pairs = Vec::new();
        if !include.is_empty() {
            pairs.push(("include_tables", Some(include)));
        }
        if !exclude.is_empty() {
            pairs.push(("exclude_tables", Some(exclude)));
        }
        PluginOptions::parse(pairs).unwrap()
    }

    const ALTER: &str = r#"{"v": 1, "tag": "ALTER TABLE", "origin": "statement", "statement": " ALTER TABLE t ADD c int",
        "search_path": "public", "objects": [{"type": "table", "schema": "app", "name": "t", "table": null, "identity": "app.t"}]}"#;

    #[test]
    fn selection_by_names_whole_schemas_and_the_database() {
        let alter = command(ALTER);
        assert!(alter.selected(&selection("", "")));
        assert!(alter.selected(&selection("app.*", "")));
        assert!(alter.selected(&selection("app.t", "")));
        assert!(!alter.selected(&selection("app.u", "")));
        assert!(!alter.selected(&selection("app.*", "app.t")));
        // An index decides by its table.
        let index = command(
            r#"{"tag": "CREATE INDEX", "origin": "statement", "statement": "CREATE INDEX i ON app.t (c)",
                "objects": [{"type": "index", "schema": "app", "name": "i", "table": "t", "identity": "app.i"}]}"#,
        );
        assert!(index.selected(&selection("app.t", "")));
        // A DROP TABLE lists the table and unnamed dependents (a default):
        // the names decide, an excluded table's dependents do not select it.
        let drop = command(
            r#"{"tag": "DROP TABLE", "origin": "statement", "statement": "DROP TABLE app.secret",
                "objects": [{"type": "table", "schema": "app", "name": "secret", "identity": "app.secret"},
                            {"type": "default value", "schema": "app", "name": null, "identity": "for app.secret.id"}]}"#,
        );
        assert!(!drop.selected(&selection("app.*", "app.secret")));
        assert!(drop.selected(&selection("app.*", "")));
        // Unnamed objects only: a schema selected whole.
        let operator = command(
            r#"{"tag": "CREATE OPERATOR", "origin": "statement", "statement": "CREATE OPERATOR app.=== (...)",
                "objects": [{"type": "operator", "schema": "app", "identity": "app.===(int,int)"}]}"#,
        );
        assert!(operator.selected(&selection("app.*", "")));
        assert!(!operator.selected(&selection("app.t", "")));
        // Schemas, and objects outside any schema.
        let schema = command(
            r#"{"tag": "CREATE SCHEMA", "origin": "statement", "statement": "CREATE SCHEMA s",
            "objects": [{"type": "schema", "schema": null, "identity": "s"}]}"#,
        );
        assert!(schema.selected(&selection("s.*", "")) && !schema.selected(&selection("app.*", "")));
        let extension = command(
            r#"{"tag": "CREATE EXTENSION", "origin": "statement", "statement": "CREATE EXTENSION hstore",
            "objects": [{"type": "extension", "schema": null, "identity": "hstore"}]}"#,
        );
        assert!(extension.selected(&selection("", "")) && !extension.selected(&selection("app.*", "")));
        // A failed capture without objects stops the task wherever it ran.
        let failed = command(r#"{"tag": "ALTER TABLE", "origin": "error", "error": "boom", "objects": []}"#);
        assert!(failed.selected(&selection("app.t", "")));
    }

    #[test]
    fn replay_text_by_origin() {
        assert_eq!(command(ALTER).replay_text(), Ok(Some("ALTER TABLE t ADD c int".into())));
        let concurrently = r#"{"tag": "CREATE INDEX", "origin": "statement", "statement": "CREATE INDEX CONCURRENTLY i ON t (c)"}"#;
        assert_eq!(command(concurrently).replay_text(), Ok(Some("CREATE INDEX i ON t (c)".into())));
        let several = r#"{"tag": "ALTER TABLE", "origin": "query", "statement": "ALTER TABLE t ADD c int; INSERT INTO t VALUES (1)"}"#;
        assert_eq!(command(several).replay_text(), Err(NotReplayable::SeveralStatements(2)));
        let one = r#"{"tag": "ALTER TABLE", "origin": "query", "statement": "ALTER TABLE t ADD c int;"}"#;
        assert_eq!(command(one).replay_text(), Ok(Some("ALTER TABLE t ADD c int".into())));
        let other = r#"{"tag": "ALTER TABLE", "origin": "query", "statement": "SELECT f()"}"#;
        assert_eq!(command(other).replay_text(), Err(NotReplayable::NotTheStatement("ALTER TABLE".into())));
        let function = r#"{"tag": "ALTER TABLE", "origin": "function", "statement": null}"#;
        assert_eq!(command(function).replay_text(), Err(NotReplayable::InFunction));
        let owner = r#"{"tag": "ALTER TABLE", "origin": "statement", "statement": "ALTER TABLE t OWNER TO bob"}"#;
        assert_eq!(command(owner).replay_text(), Ok(None));
        let select_into =
            r#"{"tag": "SELECT INTO", "origin": "generated", "statement": "CREATE TABLE IF NOT EXISTS public.x (a integer)"}"#;
        assert!(command(select_into).replay_text().unwrap().unwrap().starts_with("CREATE TABLE"));
        assert!(DdlCommand::parse(b"{not json").is_err());
    }
}
