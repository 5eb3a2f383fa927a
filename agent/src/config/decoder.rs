//! `source.decoder`: which logical decoding output plugin a task streams
//! from, chosen from what the source has. Pure logic: the facts are read
//! by the callers (the agent, precheck) with [`FACTS_SQL`].

use serde::{Deserialize, Serialize};

/// `source.decoder` as configured.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum DecoderChoice {
    /// decant where the source has the plugin and allows it, else pgoutput
    /// (PostgreSQL 10+; before 14 only when no DDL capture is installed,
    /// since pgoutput passes logical messages from 14 on), else
    /// test_decoding.
    #[default]
    Auto,
    Decant,
    Pgoutput,
    TestDecoding,
}

/// An output plugin the agent can read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoder {
    /// decant's own plugin: its records as they are.
    Decant,
    /// Built into PostgreSQL 10+: logical replication protocol version 1.
    Pgoutput,
    /// contrib's text output.
    TestDecoding,
}

impl Decoder {
    pub fn plugin(self) -> &'static str {
        match self {
            Decoder::Decant => "decant",
            Decoder::Pgoutput => "pgoutput",
            Decoder::TestDecoding => "test_decoding",
        }
    }

    pub fn from_plugin(name: &str) -> Option<Decoder> {
        [Decoder::Decant, Decoder::Pgoutput, Decoder::TestDecoding].into_iter().find(|d| d.plugin() == name)
    }

    /// Whether the source's logical messages (DDL capture, heartbeats)
    /// reach the agent through this plugin on a server of `version`.
    pub fn passes_messages(self, version: u32) -> bool {
        self != Decoder::Pgoutput || version >= 140000
    }
}

/// One row of text: server_version_num, whether the decant package is
/// installed, output_plugin_libraries (NULL where the server has no such
/// setting, and for roles that may not read it: pg_settings hides it from
/// them, where current_setting would fail), whether decant's DDL capture
/// is installed. Runs on a SQL or a
/// replication connection.
pub const FACTS_SQL: &str = "SELECT current_setting('server_version_num'), \
     EXISTS (SELECT FROM pg_available_extensions WHERE name = 'decant')::text, \
     (SELECT setting FROM pg_settings WHERE name = 'output_plugin_libraries'), \
     EXISTS (SELECT FROM pg_event_trigger WHERE evtname = 'decant_ddl_end')::text";

/// The source's tables that a publication FOR ALL TABLES would cover and
/// that have no replica identity (`schema.table`, quoted as needed): while
/// such a publication exists, PostgreSQL refuses their UPDATEs and
/// DELETEs. Runs on a SQL or a replication connection.
pub const UNIDENTIFIED_TABLES_SQL: &str = "SELECT format('%I.%I', n.nspname, c.relname)
       FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
      WHERE c.relkind = 'r' AND c.relpersistence = 'p'
        AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_toast'
        AND (c.relreplident = 'n'
             OR (c.relreplident = 'd' AND NOT EXISTS (SELECT FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary))
             OR (c.relreplident = 'i' AND NOT EXISTS (SELECT FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident)))
      ORDER BY 1";

/// What the choice depends on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceFacts {
    pub server_version: u32,
    pub decant_installed: bool,
    /// `output_plugin_libraries` when the server has it.
    pub allowed_plugins: Option<Vec<String>>,
    pub ddl_capture: bool,
}

impl SourceFacts {
    /// From the text row of [`FACTS_SQL`].
    pub fn from_row(row: &[Option<String>]) -> Option<SourceFacts> {
        let text = |i: usize| row.get(i).cloned().flatten();
        Some(SourceFacts {
            server_version: text(0)?.parse().ok()?,
            decant_installed: text(1)? == "true",
            allowed_plugins: text(2)
                .map(|list| list.split(',').map(|s| s.trim().trim_matches('"').to_owned()).filter(|s| !s.is_empty()).collect()),
            ddl_capture: text(3)? == "true",
        })
    }

    fn allows(&self, plugin: &str) -> bool {
        self.allowed_plugins.as_ref().is_none_or(|list| list.iter().any(|p| p == plugin))
    }
}

impl DecoderChoice {
    /// As written in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            DecoderChoice::Auto => "auto",
            DecoderChoice::Decant => "decant",
            DecoderChoice::Pgoutput => "pgoutput",
            DecoderChoice::TestDecoding => "test_decoding",
        }
    }

    /// The decoder an explicit choice names; `Auto` names decant.
    pub fn resolve_unchecked(self) -> Decoder {
        match self {
            DecoderChoice::Auto | DecoderChoice::Decant => Decoder::Decant,
            DecoderChoice::Pgoutput => Decoder::Pgoutput,
            DecoderChoice::TestDecoding => Decoder::TestDecoding,
        }
    }

    /// The plugin for a source with `facts`, or why none fits.
    pub fn resolve(self, facts: &SourceFacts) -> Result<Decoder, String> {
        let v = facts.server_version;
        let chosen = match self {
            DecoderChoice::Decant => Decoder::Decant,
            DecoderChoice::Pgoutput => Decoder::Pgoutput,
            DecoderChoice::TestDecoding => Decoder::TestDecoding,
            DecoderChoice::Auto if facts.decant_installed && facts.allows("decant") && v >= 130000 => Decoder::Decant,
            DecoderChoice::Auto if v >= 100000 && (!facts.ddl_capture || v >= 140000) && facts.allows("pgoutput") => Decoder::Pgoutput,
            DecoderChoice::Auto => Decoder::TestDecoding,
        };
        if chosen == Decoder::Pgoutput && v < 100000 {
            return Err(format!("source.decoder = \"pgoutput\" needs PostgreSQL 10 or later (the source runs {v}); use \"test_decoding\""));
        }
        if chosen == Decoder::Decant && !facts.decant_installed {
            return Err(
                "source.decoder = \"decant\" but the decant plugin is not installed on the source; install decant's package, or set \
                 source.decoder = \"auto\" to use a built-in plugin"
                    .into(),
            );
        }
        if !facts.allows(chosen.plugin()) {
            return Err(format!(
                "the source's output_plugin_libraries does not list {0}, so the server refuses a slot with plugin {0}; add it \
                 (then SELECT pg_reload_conf()) or choose another source.decoder",
                chosen.plugin()
            ));
        }
        Ok(chosen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(v: u32, decant: bool, allowed: Option<&[&str]>, ddl: bool) -> SourceFacts {
        SourceFacts {
            server_version: v,
            decant_installed: decant,
            allowed_plugins: allowed.map(|l| l.iter().map(|s| (*s).to_owned()).collect()),
            ddl_capture: ddl,
        }
    }

    #[test]
    fn auto_prefers_the_plugin_then_pgoutput_then_test_decoding() {
        let auto = DecoderChoice::Auto;
        assert_eq!(auto.resolve(&facts(150000, true, None, true)), Ok(Decoder::Decant));
        assert_eq!(auto.resolve(&facts(150020, true, Some(&["pgoutput", "decant"]), false)), Ok(Decoder::Decant));
        assert_eq!(auto.resolve(&facts(150020, true, Some(&["pgoutput"]), false)), Ok(Decoder::Pgoutput));
        assert_eq!(auto.resolve(&facts(120000, false, None, false)), Ok(Decoder::Pgoutput));
        // pgoutput would drop the DDL capture's messages before 14.
        assert_eq!(auto.resolve(&facts(120000, false, None, true)), Ok(Decoder::TestDecoding));
        assert_eq!(auto.resolve(&facts(140000, false, None, true)), Ok(Decoder::Pgoutput));
        assert_eq!(auto.resolve(&facts(90600, false, None, false)), Ok(Decoder::TestDecoding));
        assert!(DecoderChoice::Pgoutput.resolve(&facts(90600, false, None, false)).is_err());
        assert!(DecoderChoice::Decant.resolve(&facts(150000, false, None, false)).is_err());
        assert!(DecoderChoice::TestDecoding.resolve(&facts(150020, true, Some(&["decant"]), false)).is_err());
        let row = ["120005", "false", "decant, \"pgoutput\"", "true"].map(|s| Some(s.to_owned()));
        assert_eq!(SourceFacts::from_row(&row), Some(facts(120005, false, Some(&["decant", "pgoutput"]), true)));
    }
}
