//! The built-in output plugins as sources of decant records: pgoutput
//! (PostgreSQL 10+) and test_decoding, for servers where decant's plugin
//! is not installed. Their output is turned into the records the plugin
//! would have written (CRC computed here), so the applier and its
//! exactly-once bookkeeping do not know the difference. Which plugin a
//! task uses is chosen in `config::decoder`.

pub mod output;
mod pgoutput;
mod relations;
mod test_decoding;

use decant_proto::options::PluginOptions;
use decant_proto::Lsn;

pub use crate::config::decoder::{Decoder, DecoderChoice, SourceFacts, FACTS_SQL, UNIDENTIFIED_TABLES_SQL};
use crate::connect::sql::{quote_ident, quote_literal};
use crate::connect::ConnInfo;
pub use relations::CatalogError;

use super::client::{ReplicationClient, ReplicationError};
use super::slot::CreatedSlot;

#[derive(Debug, thiserror::Error)]
pub enum TranslateError {
    #[error("{0}")]
    Protocol(String),
    #[error("{0}")]
    Catalog(#[from] CatalogError),
    #[error("cannot hold a transaction's records in a temporary file: {0}")]
    Io(#[from] std::io::Error),
}

/// Turns a built-in plugin's messages into decant records.
pub enum Translator {
    Pgoutput(pgoutput::Pgoutput),
    TestDecoding(test_decoding::TestDecoding),
}

impl Translator {
    /// None for decant's own plugin, whose output needs no translation.
    pub async fn new(decoder: Decoder, source: &ConnInfo, selection: PluginOptions) -> Result<Option<Translator>, TranslateError> {
        Ok(match decoder {
            Decoder::Decant => None,
            Decoder::Pgoutput => Some(Translator::Pgoutput(pgoutput::Pgoutput::new(relations::Catalog::connect(source).await?, selection))),
            Decoder::TestDecoding => {
                let catalog = relations::Catalog::connect(source).await?;
                catalog.require_utf8().await?;
                Some(Translator::TestDecoding(test_decoding::TestDecoding::new(catalog, selection)))
            }
        })
    }

    /// One message of the plugin, sent at `at` (the XLogData start).
    pub async fn feed(&mut self, at: Lsn, payload: &[u8]) -> Result<(), TranslateError> {
        match self {
            Translator::Pgoutput(p) => p.feed(payload).await,
            Translator::TestDecoding(t) => t.feed(at, payload).await,
        }
    }

    pub fn plugin(&self) -> &'static str {
        match self {
            Translator::Pgoutput(_) => Decoder::Pgoutput.plugin(),
            Translator::TestDecoding(_) => Decoder::TestDecoding.plugin(),
        }
    }

    /// Translated records ready to go, in chunks of whole records.
    pub fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, TranslateError> {
        Ok(self.output().next_chunk()?)
    }

    pub fn has_output(&self) -> bool {
        match self {
            Translator::Pgoutput(p) => p.output.has_output(),
            Translator::TestDecoding(t) => t.output.has_output(),
        }
    }

    fn output(&mut self) -> &mut output::Output {
        match self {
            Translator::Pgoutput(p) => &mut p.output,
            Translator::TestDecoding(t) => &mut t.output,
        }
    }
}

/// The source's facts for choosing a decoder, read on the replication
/// connection.
pub async fn source_facts(repl: &mut ReplicationClient) -> Result<SourceFacts, ReplicationError> {
    let rows = repl.simple_query(FACTS_SQL).await?;
    rows.first()
        .and_then(|row| SourceFacts::from_row(row))
        .ok_or_else(|| ReplicationError::Protocol("cannot read the source's version and plugins".into()))
}

/// The options of START_REPLICATION for a built-in plugin.
pub fn start_options(decoder: Decoder, publication: &str, server_version: u32) -> Vec<(&'static str, String)> {
    match decoder {
        Decoder::Decant => Vec::new(),
        Decoder::Pgoutput => {
            let mut o = vec![("proto_version", "1".to_owned()), ("publication_names", quote_ident(publication))];
            if server_version >= 140000 {
                o.push(("messages", "true".to_owned()));
            }
            o
        }
        // Not skip-empty-xacts: with it, a transaction holding only a
        // transactional message (a captured DDL statement) comes without
        // its BEGIN and COMMIT. Empty transactions are dropped here.
        Decoder::TestDecoding => {
            vec![("include-xids", "1".to_owned()), ("include-timestamp", "1".to_owned()), ("skip-empty-xacts", "0".to_owned())]
        }
    }
}

/// Creates the task's slot with the plugin `source.decoder` chooses on
/// this source (pgoutput's publication first, see [`ensure_publication`]).
pub async fn create_slot(
    repl: &mut ReplicationClient,
    source: &crate::config::Source,
    export_snapshot: bool,
) -> Result<(Decoder, CreatedSlot), PublicationError> {
    let facts = source_facts(repl).await?;
    let decoder = source.decoder.resolve(&facts).map_err(PublicationError::Refused)?;
    if decoder == Decoder::Pgoutput {
        ensure_publication(repl, source.publication()).await?;
    }
    let created = repl.create_logical_slot(&source.slot, decoder.plugin(), export_snapshot).await?;
    tracing::info!(slot = %source.slot, plugin = decoder.plugin(), consistent_point = %created.consistent_point, "created replication slot");
    Ok((decoder, created))
}

/// Creates the publication FOR ALL TABLES when it does not exist (before
/// the slot: pgoutput reads it as of the WAL it decodes). A configured
/// publication that exists is used as it is.
///
/// PostgreSQL refuses UPDATE and DELETE on a table without a replica
/// identity once a publication that publishes them covers it: creating one
/// FOR ALL TABLES while such tables exist would break the applications
/// writing them, so it is refused, naming them.
pub async fn ensure_publication(repl: &mut ReplicationClient, name: &str) -> Result<(), PublicationError> {
    let exists = !repl.simple_query(&format!("SELECT 1 FROM pg_publication WHERE pubname = {}", quote_literal(name))).await?.is_empty();
    if exists {
        return Ok(());
    }
    let unidentified: Vec<String> =
        repl.simple_query(UNIDENTIFIED_TABLES_SQL).await?.into_iter().filter_map(|row| row.into_iter().next().flatten()).collect();
    if !unidentified.is_empty() {
        return Err(PublicationError::Unidentified { name: name.to_owned(), tables: unidentified });
    }
    repl.simple_query(&format!("CREATE PUBLICATION {} FOR ALL TABLES", quote_ident(name))).await?;
    tracing::info!(publication = name, "created publication FOR ALL TABLES for pgoutput");
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum PublicationError {
    #[error("{0}")]
    Source(#[from] ReplicationError),
    /// `source.decoder` cannot be used on this source.
    #[error("{0}")]
    Refused(String),
    #[error(
        "pgoutput needs a publication, and creating {name:?} FOR ALL TABLES would make the source refuse UPDATE and DELETE \
         on its tables without a replica identity: {}; give them one (a primary key, or ALTER TABLE … REPLICA IDENTITY FULL), \
         or create a publication of the tables to migrate yourself and set source.publication, or use source.decoder = \
         \"test_decoding\" (no publication)",
        list(tables)
    )]
    Unidentified { name: String, tables: Vec<String> },
}

fn list(tables: &[String]) -> String {
    let shown = tables.iter().take(10).cloned().collect::<Vec<_>>().join(", ");
    if tables.len() > 10 {
        format!("{shown} and {} more", tables.len() - 10)
    } else {
        shown
    }
}
