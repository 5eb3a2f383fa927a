//! The options the `decant` output plugin accepts (`START_REPLICATION …
//! (name 'value', …)`, `pg_recvlogical -o name=value`, or the variadic
//! arguments of `pg_logical_slot_get_binary_changes`). Parsed here so the
//! plugin and its consumers share one definition, and validated strictly:
//! an unknown option or a bad value is an error naming it.

use std::fmt;

use crate::FORMAT_VERSION;

/// With `pack_transactions`, a walsender holds a COMMIT back (keeps it in
/// the current message) only while at least this much WAL is already
/// flushed beyond it. A consumer that learns the source's WAL is this far
/// past the last COMMIT it received may be missing a held one.
pub const PACKING_BACKLOG_BYTES: u64 = 1 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginOptions {
    /// Record format version to write (only [`FORMAT_VERSION`] exists).
    pub format_version: u8,
    /// Emit `pg_logical_emit_message` messages (default on).
    pub include_messages: bool,
    /// Which changes to emit by replication origin.
    pub origin: OriginFilter,
    /// Emit only tables matching one of these (all tables when empty).
    pub include_tables: Vec<TablePattern>,
    /// Never emit tables matching one of these.
    pub exclude_tables: Vec<TablePattern>,
    /// 0: one record per output message. Otherwise the records of a
    /// transaction are packed into messages of up to this many bytes (a
    /// message is always sent at COMMIT), which saves the per-message cost
    /// of the walsender and the consumer. Memory stays bounded by this size.
    pub max_message_bytes: u32,
    /// With `max_message_bytes`: a message may also hold several
    /// transactions. At a COMMIT, while the walsender has a backlog (1 MB or
    /// more of WAL waiting to be decoded), the records stay in the message (the next commit is
    /// usually a few hundred bytes further on); they are sent when the
    /// message is full, when decoding catches up with the WAL, or with the
    /// next non-transactional message. Only a walsender ever holds records
    /// back (the SQL functions end at their last record). A consumer must
    /// then not take the walsender's keepalive position as proof that every
    /// earlier commit reached it: a held commit may lie before it. The
    /// position of a non-transactional message is such proof.
    pub pack_transactions: bool,
}

/// Bounds of `max_message_bytes` (besides 0).
pub const MESSAGE_BYTES_RANGE: std::ops::RangeInclusive<u32> = 1024..=(16 << 20);

impl Default for PluginOptions {
    fn default() -> Self {
        PluginOptions {
            format_version: FORMAT_VERSION,
            include_messages: true,
            origin: OriginFilter::Any,
            include_tables: Vec::new(),
            exclude_tables: Vec::new(),
            max_message_bytes: 0,
            pack_transactions: false,
        }
    }
}

/// `origin = any | none`, as in PostgreSQL 16's subscriptions: `none` skips
/// changes that were themselves replicated into the source (they carry a
/// replication origin), which prevents loops between two databases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OriginFilter {
    Any,
    None,
}

/// The names of every option, for documentation and error messages.
pub const OPTION_NAMES: &[&str] =
    &["format_version", "include_messages", "origin", "include_tables", "exclude_tables", "max_message_bytes", "pack_transactions"];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptionError {
    pub option: String,
    pub message: String,
}

impl fmt::Display for OptionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "decant: option \"{}\": {}", self.option, self.message)
    }
}

impl std::error::Error for OptionError {}

fn error(option: &str, message: impl Into<String>) -> OptionError {
    OptionError { option: option.to_owned(), message: message.into() }
}

fn parse_bool(option: &str, value: Option<&str>) -> Result<bool, OptionError> {
    // A bare option name means "on", as in PostgreSQL's own option lists.
    let Some(value) = value else { return Ok(true) };
    match value.to_ascii_lowercase().as_str() {
        "true" | "on" | "yes" | "1" => Ok(true),
        "false" | "off" | "no" | "0" => Ok(false),
        _ => Err(error(option, format!("invalid value {value:?}: expected a boolean (true/false, on/off, yes/no, 1/0)"))),
    }
}

impl PluginOptions {
    /// Parses `(name, value)` pairs; a later pair overrides an earlier one.
    pub fn parse<'a>(pairs: impl IntoIterator<Item = (&'a str, Option<&'a str>)>) -> Result<Self, OptionError> {
        let mut o = PluginOptions::default();
        for (name, value) in pairs {
            let required = || value.ok_or_else(|| error(name, "requires a value"));
            match name {
                "format_version" => {
                    let v = required()?;
                    o.format_version = match v.trim().parse::<u8>() {
                        Ok(FORMAT_VERSION) => FORMAT_VERSION,
                        _ => {
                            return Err(error(name, format!("unsupported value {v:?}: this decant writes format version {FORMAT_VERSION}")))
                        }
                    };
                }
                "include_messages" => o.include_messages = parse_bool(name, value)?,
                "pack_transactions" => o.pack_transactions = parse_bool(name, value)?,
                "origin" => {
                    let v = required()?;
                    o.origin = match v.to_ascii_lowercase().as_str() {
                        "any" => OriginFilter::Any,
                        "none" => OriginFilter::None,
                        _ => return Err(error(name, format!("invalid value {v:?}: expected \"any\" or \"none\""))),
                    };
                }
                "include_tables" => o.include_tables = TablePattern::parse_list(name, required()?)?,
                "exclude_tables" => o.exclude_tables = TablePattern::parse_list(name, required()?)?,
                "max_message_bytes" => {
                    let v = required()?;
                    o.max_message_bytes = match v.trim().parse::<u32>() {
                        Ok(n) if n == 0 || MESSAGE_BYTES_RANGE.contains(&n) => n,
                        _ => {
                            return Err(error(
                                name,
                                format!(
                                    "invalid value {v:?}: expected 0 (one record per message) or {} to {}",
                                    MESSAGE_BYTES_RANGE.start(),
                                    MESSAGE_BYTES_RANGE.end()
                                ),
                            ))
                        }
                    };
                }
                _ => {
                    return Err(OptionError {
                        option: name.to_owned(),
                        message: format!("unknown option; valid options are {}", OPTION_NAMES.join(", ")),
                    })
                }
            }
        }
        if o.pack_transactions && o.max_message_bytes == 0 {
            return Err(error(
                "pack_transactions",
                "requires max_message_bytes (the size of the messages that transactions are packed into)",
            ));
        }
        Ok(o)
    }

    /// Whether changes of `schema.table` are emitted. Never those of
    /// schema `decant`: decant's own bookkeeping (the applier's on a
    /// destination, the extension's on a source) is not the user's data,
    /// and a stream read from a destination must not carry it back.
    pub fn table_selected(&self, schema: &[u8], table: &[u8]) -> bool {
        if schema == b"decant" {
            return false;
        }
        let included = self.include_tables.is_empty() || self.include_tables.iter().any(|p| p.matches(schema, table));
        included && !self.exclude_tables.iter().any(|p| p.matches(schema, table))
    }

    /// Whether every table of `schema` is selected, whatever its name (an
    /// include pattern `schema.*` or none at all, and no exclude pattern
    /// for that schema): objects of the schema that belong to no table
    /// (types, operators, …) then belong to the selection.
    pub fn schema_selected_whole(&self, schema: &[u8]) -> bool {
        if schema == b"decant" {
            return false;
        }
        let included = self.include_tables.is_empty() || self.include_tables.iter().any(|p| p.covers_schema(schema));
        included && !self.exclude_tables.iter().any(|p| glob_match(&p.schema, schema))
    }
}

/// `schema.table`, where either part may contain `*` (any run of
/// characters). A backslash takes the next character literally, for names
/// that contain `.`, `,`, `*` or `\`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TablePattern {
    schema: Vec<Glob>,
    table: Vec<Glob>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Glob {
    Byte(u8),
    Star,
}

impl TablePattern {
    /// Parses a comma-separated list of patterns.
    pub fn parse_list(option: &str, list: &str) -> Result<Vec<TablePattern>, OptionError> {
        let mut patterns = Vec::new();
        let mut parts: Vec<Vec<Glob>> = vec![Vec::new()];
        let mut bytes = list.bytes();
        let finish = |parts: &mut Vec<Vec<Glob>>, patterns: &mut Vec<TablePattern>| -> Result<(), OptionError> {
            let taken = std::mem::replace(parts, vec![Vec::new()]);
            match <[Vec<Glob>; 2]>::try_from(taken) {
                Ok([schema, table]) if !schema.is_empty() && !table.is_empty() => {
                    patterns.push(TablePattern { schema, table });
                    Ok(())
                }
                _ => Err(error(
                    option,
                    format!("invalid table pattern list {list:?}: each entry must be schema.table (\"*\" matches any characters)"),
                )),
            }
        };
        while let Some(b) = bytes.next() {
            let current = parts.last_mut().expect("parts always holds the part being read");
            match b {
                b'\\' => match bytes.next() {
                    Some(escaped) => current.push(Glob::Byte(escaped)),
                    None => return Err(error(option, format!("invalid table pattern list {list:?}: ends with a lone backslash"))),
                },
                b'*' => current.push(Glob::Star),
                b'.' => parts.push(Vec::new()),
                b',' => finish(&mut parts, &mut patterns)?,
                b' ' if current.is_empty() => {}
                _ => current.push(Glob::Byte(b)),
            }
        }
        finish(&mut parts, &mut patterns)?;
        Ok(patterns)
    }

    pub fn matches(&self, schema: &[u8], table: &[u8]) -> bool {
        glob_match(&self.schema, schema) && glob_match(&self.table, table)
    }

    /// Whether it matches every table of `schema` (`schema.*`).
    fn covers_schema(&self, schema: &[u8]) -> bool {
        self.table == [Glob::Star] && glob_match(&self.schema, schema)
    }
}

fn glob_match(pattern: &[Glob], name: &[u8]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((Glob::Star, rest)) => (0..=name.len()).any(|i| glob_match(rest, &name[i..])),
        Some((Glob::Byte(b), rest)) => name.first() == Some(b) && glob_match(rest, &name[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, Option<&str>)]) -> Result<PluginOptions, OptionError> {
        PluginOptions::parse(pairs.iter().copied())
    }

    #[test]
    fn defaults_and_values() {
        assert_eq!(parse(&[]).unwrap(), PluginOptions::default());
        let o = parse(&[("include_messages", Some("off")), ("origin", Some("none")), ("format_version", Some("1"))]).unwrap();
        assert!(!o.include_messages);
        assert_eq!(o.origin, OriginFilter::None);
        assert!(parse(&[("include_messages", None)]).unwrap().include_messages);
    }

    #[test]
    fn bad_options_name_themselves() {
        let e = parse(&[("include_mesages", Some("on"))]).unwrap_err();
        assert_eq!(e.option, "include_mesages");
        assert!(e.to_string().contains("unknown option"), "{e}");
        for (name, value) in [
            ("format_version", "2"),
            ("include_messages", "maybe"),
            ("origin", "some"),
            ("include_tables", "nodot"),
            ("max_message_bytes", "10"),
            ("pack_transactions", "sometimes"),
        ] {
            let e = parse(&[(name, Some(value))]).unwrap_err();
            assert_eq!(e.option, name);
            assert!(e.to_string().contains(value), "{e}");
        }
        assert!(parse(&[("origin", None)]).is_err());
        let e = parse(&[("pack_transactions", Some("on"))]).unwrap_err();
        assert!(e.to_string().contains("requires max_message_bytes"), "{e}");
        assert!(parse(&[("max_message_bytes", Some("65536")), ("pack_transactions", None)]).unwrap().pack_transactions);
    }

    #[test]
    fn table_patterns() {
        let o = parse(&[("include_tables", Some("public.*, app.order*")), ("exclude_tables", Some("public.skip_me"))]).unwrap();
        assert!(o.table_selected(b"public", b"t"));
        assert!(!o.table_selected(b"public", b"skip_me"));
        assert!(o.table_selected(b"app", b"orders"));
        assert!(!o.table_selected(b"app", b"customers"));
        let o = parse(&[("exclude_tables", Some(r"s\.x.a\,b"))]).unwrap();
        assert!(!o.table_selected(b"s.x", b"a,b"));
        assert!(o.table_selected(b"s", b"x"));
        assert!(!PluginOptions::default().table_selected(b"decant", b"health"));
        assert!(parse(&[("include_tables", Some("a.b.c"))]).is_err());
        assert!(parse(&[("include_tables", Some("a.b,"))]).is_err());
    }

    #[test]
    fn schemas_selected_whole() {
        let o = parse(&[("include_tables", Some("public.*, app.order*, s*.*")), ("exclude_tables", Some("sales.secret"))]).unwrap();
        assert!(o.schema_selected_whole(b"public"));
        assert!(!o.schema_selected_whole(b"app"), "only some of app's tables");
        assert!(o.schema_selected_whole(b"stock"));
        assert!(!o.schema_selected_whole(b"sales"), "one of sales' tables is excluded");
        assert!(!o.schema_selected_whole(b"other"));
        assert!(PluginOptions::default().schema_selected_whole(b"anything"));
        assert!(!PluginOptions::default().schema_selected_whole(b"decant"));
    }
}
