//! Quoting names and values into SQL text: pure text, below every other
//! module (the configuration's mapping builds SQL with it too).

/// A double-quoted identifier, for replication commands and SQL alike.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A single-quoted literal.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}
