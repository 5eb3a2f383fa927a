//! Precheck of what the incremental phase decodes with: the decoder that
//! `source.decoder` resolves to on this source (see `config::decoder`),
//! and what that decoder needs: decant's package and
//! `output_plugin_libraries`, pgoutput's publication, test_decoding's
//! encoding.

use tokio_postgres::{Client, SimpleQueryMessage};

use super::server::Server;
use super::{Check, Findings};
use crate::config::decoder::{Decoder, DecoderChoice, SourceFacts, FACTS_SQL, UNIDENTIFIED_TABLES_SQL};
use crate::config::Config;

pub(super) async fn check(
    client: &Client,
    server: &Server,
    config: &Config,
    libraries_setting: Option<&str>,
    f: &mut Findings,
) -> Result<(), tokio_postgres::Error> {
    let row: Vec<Option<String>> = client
        .simple_query(FACTS_SQL)
        .await?
        .into_iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect()),
            _ => None,
        })
        .unwrap_or_default();
    let Some(facts) = SourceFacts::from_row(&row) else { return Ok(()) };
    let choice = config.source.decoder;
    // decant asked for by name: its own checks below say in detail what
    // is missing (the package, the output_plugin_libraries entry).
    let resolved = if choice == DecoderChoice::Decant { Ok(Decoder::Decant) } else { choice.resolve(&facts) };
    let decoder = match resolved {
        Ok(d) => d,
        Err(e) => {
            f.error(Check::SourcePlugin, "source.decoder", e, "see the README, \"Decoders and PostgreSQL versions\"");
            return Ok(());
        }
    };
    let v = facts.server_version;
    match decoder {
        Decoder::Decant => decant_plugin(client, &server.user, libraries_setting, f).await?,
        Decoder::Pgoutput => {
            f.pass(
                Check::SourcePlugin,
                "pgoutput",
                format!(
                    "source.decoder = \"{}\": pgoutput, built into PostgreSQL; the agent turns its output into decant's records",
                    choice.name()
                ),
            );
            let publication = config.source.publication();
            let exists = client.query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&publication]).await?.is_some();
            if !exists {
                let unidentified = client.query(UNIDENTIFIED_TABLES_SQL, &[]).await?.len();
                if unidentified > 0 {
                    f.error(
                        Check::SourcePlugin,
                        publication,
                        format!(
                            "pgoutput reads a publication, and creating {publication:?} FOR ALL TABLES would make the source refuse \
                             UPDATE and DELETE on its {unidentified} table(s) without a replica identity"
                        ),
                        "give them a primary key or REPLICA IDENTITY FULL, or create a publication of the tables to migrate and set \
                         source.publication, or set source.decoder = \"test_decoding\"",
                    );
                } else if !(server.superuser) {
                    f.warn(
                        Check::SourcePlugin,
                        publication,
                        format!("publication {publication:?} does not exist and creating it FOR ALL TABLES needs a superuser"),
                        format!("as a superuser: CREATE PUBLICATION \"{publication}\" FOR ALL TABLES"),
                    );
                }
            }
            if v < 140000 && facts.ddl_capture {
                f.error(
                    Check::SourceDdlCapture,
                    "pgoutput",
                    format!(
                        "pgoutput passes logical messages only from PostgreSQL 14 on (the source runs {}), so captured DDL would be lost",
                        server.version
                    ),
                    "set source.decoder = \"test_decoding\" (or \"auto\", which chooses it here)",
                );
            }
        }
        Decoder::TestDecoding => {
            f.pass(
                Check::SourcePlugin,
                "test_decoding",
                format!("source.decoder = \"{}\": test_decoding (contrib); the agent turns its text into decant's records", choice.name()),
            );
            if server.encoding != "UTF8" && server.encoding != "SQL_ASCII" {
                f.error(
                    Check::SourcePlugin,
                    "test_decoding",
                    format!(
                        "the source's encoding is {}: test_decoding writes text unconverted, and decant's records are UTF-8",
                        server.encoding
                    ),
                    "set source.decoder = \"pgoutput\" (or install decant's plugin)",
                );
            }
        }
    }
    if v < 110000 && decoder != Decoder::Decant {
        f.warn(
            Check::SourcePlugin,
            "TRUNCATE",
            format!(
                "PostgreSQL {} does not decode TRUNCATE (logical decoding has it from 11 on): a TRUNCATE on the source is not replicated",
                server.version
            ),
            "do not TRUNCATE selected tables during the migration (DELETE instead), or run the same TRUNCATE on the destination",
        );
    }
    Ok(())
}

/// The plugin library on the source, and whether the server lets a
/// slot use it.
async fn decant_plugin(
    client: &Client,
    user: &str,
    libraries_setting: Option<&str>,
    f: &mut Findings,
) -> Result<(), tokio_postgres::Error> {
    let available: Option<String> = client
        .query_opt("SELECT coalesce(default_version, '') FROM pg_available_extensions WHERE name = 'decant'", &[])
        .await?
        .map(|r| r.get(0));
    match available {
        Some(v) => f.pass(
            Check::SourcePlugin,
            "decant",
            format!("the decant package {v} (plugin library and extension) is installed on the source server"),
        ),
        None => f.error(
            Check::SourcePlugin,
            "decant",
            "the decant plugin is not installed on the source server: a slot with plugin decant cannot be created",
            "install decant's PostgreSQL package for the source's major version on the source server (it holds the plugin \
             library decant and the extension); see the README, \"Using the plugin on your own server\"",
        ),
    }
    // pg_settings hides the setting from users who may not read it;
    // current_setting then says whether it exists.
    let libraries = match libraries_setting {
        Some(list) => Ok(Some(list.to_owned())),
        None => match client.query_one("SELECT current_setting('output_plugin_libraries', true)", &[]).await {
            Ok(row) => Ok(row.get::<_, Option<String>>(0)),
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => Err(()),
            Err(e) => return Err(e),
        },
    };
    match libraries {
        Ok(None) => f.pass(
            Check::SourceOutputPluginLibraries,
            "output_plugin_libraries",
            "this server has no output_plugin_libraries: any installed plugin may be used",
        ),
        Err(()) => f.warn(
            Check::SourceOutputPluginLibraries,
            "output_plugin_libraries",
            format!(
                "this server has output_plugin_libraries, which {} may not read (superuser or pg_read_all_settings): a \
                 slot with plugin decant is refused unless it lists decant",
                user
            ),
            "as a superuser, SHOW output_plugin_libraries; if decant is missing, add it in the source's postgresql.conf \
             (output_plugin_libraries = '…, decant'), then SELECT pg_reload_conf() (a reload suffices)",
        ),
        Ok(Some(list)) => {
            let names: Vec<&str> = list.split(',').map(|s| s.trim().trim_matches('"')).filter(|s| !s.is_empty()).collect();
            if names.contains(&"decant") {
                f.pass(
                    Check::SourceOutputPluginLibraries,
                    "output_plugin_libraries",
                    format!("output_plugin_libraries '{list}' allows decant"),
                );
            } else {
                let fixed = names.iter().copied().chain(["decant"]).collect::<Vec<_>>().join(", ");
                f.error(
                    Check::SourceOutputPluginLibraries,
                    "output_plugin_libraries",
                    format!(
                        "output_plugin_libraries is '{list}': the server refuses a slot with plugin decant (library \"decant\" \
                         may not be used as an output plugin), superusers included"
                    ),
                    format!("in the source's postgresql.conf: output_plugin_libraries = '{fixed}', then SELECT pg_reload_conf() (a reload suffices)"),
                );
            }
        }
    }
    Ok(())
}
