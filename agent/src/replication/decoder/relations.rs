//! What the built-in decoders do not say about a table, read from the
//! source's catalog: pgoutput gives no primary key, NOT NULL or type name;
//! test_decoding gives no OID, type OID, typmod, replica identity or key.
//!
//! The catalog read is the current one, not the one of the WAL being
//! decoded (the decant plugin reads that one): after a DDL that changed a
//! table, its earlier changes are described by its new definition. Column
//! names are matched, so a dropped or renamed column is detected (see
//! [`RelationMeta::matches`]) rather than misread.

use decant_proto::{Column, ColumnFlags, Record, Relation, ReplicaIdentity};
use tokio_postgres::Client;

use crate::connect::ConnInfo;

/// A table as the stream describes it, owning its strings.
#[derive(Clone, Debug, PartialEq)]
pub struct RelationMeta {
    pub oid: u32,
    pub identity: ReplicaIdentity,
    pub schema: String,
    pub name: String,
    pub columns: Vec<ColumnMeta>,
    /// Names of generated columns (left out of `columns`, as the plugin
    /// leaves them out; test_decoding prints them).
    pub generated: Vec<String>,
    /// Chosen by the task's table selection.
    pub selected: bool,
    /// Its RELATION record went out in this session.
    pub sent: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ColumnMeta {
    pub name: String,
    pub type_oid: u32,
    pub typmod: i32,
    pub type_name: String,
    pub flags: u8,
}

impl RelationMeta {
    pub fn record(&self) -> Record<'_> {
        Record::Relation(Relation {
            oid: self.oid,
            namespace: self.schema.as_bytes(),
            name: self.name.as_bytes(),
            replica_identity: self.identity,
            columns: self
                .columns
                .iter()
                .map(|c| Column {
                    name: c.name.as_bytes(),
                    type_oid: c.type_oid,
                    typmod: c.typmod,
                    type_name: c.type_name.as_bytes(),
                    flags: ColumnFlags(c.flags),
                })
                .collect(),
        })
    }

    /// Positions of the replica identity key columns.
    pub fn key_positions(&self) -> Vec<usize> {
        self.columns.iter().enumerate().filter(|(_, c)| c.flags & ColumnFlags::IDENTITY_KEY != 0).map(|(i, _)| i).collect()
    }

    /// Whether `names` are this table's columns, in order.
    pub fn matches<'n>(&self, names: impl IntoIterator<Item = &'n str>) -> bool {
        let mut names = names.into_iter();
        self.columns.iter().all(|c| names.next() == Some(c.name.as_str())) && names.next().is_none()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("cannot read the source's catalog: {0}")]
    Query(#[from] tokio_postgres::Error),
    #[error("source catalog: {0}")]
    Connect(String),
}

/// A plain SQL session on the source for catalog reads.
pub struct Catalog {
    client: Client,
    server_version: i32,
}

impl Catalog {
    pub async fn connect(source: &ConnInfo) -> Result<Catalog, CatalogError> {
        let (client, _) = crate::connect::sql::connect(source, "decant agent catalog", "")
            .await
            .map_err(|e| CatalogError::Connect(format!("cannot connect to read it: {e}")))?;
        let server_version = client.query_one("SELECT current_setting('server_version_num')::int", &[]).await?.get(0);
        Ok(Catalog { client, server_version })
    }

    /// test_decoding writes names and values in the server's encoding,
    /// unconverted; decant's records are UTF-8.
    pub async fn require_utf8(&self) -> Result<(), CatalogError> {
        let encoding: String = self.client.query_one("SELECT current_setting('server_encoding')", &[]).await?.get(0);
        if encoding == "UTF8" || encoding == "SQL_ASCII" {
            return Ok(());
        }
        Err(CatalogError::Connect(format!(
            "the source's encoding is {encoding}: test_decoding writes text unconverted, and decant's records are UTF-8; use decoder \"pgoutput\" or \"decant\""
        )))
    }

    /// pgoutput's RELATION completed: the primary key and NOT NULL flags of
    /// its columns (by name) and their types' names as `format_type` gives
    /// them. `columns` are (name, type OID, typmod, pgoutput's key flag).
    pub async fn complete(
        &self,
        oid: u32,
        identity: ReplicaIdentity,
        columns: &[(String, u32, i32, bool)],
    ) -> Result<Vec<ColumnMeta>, CatalogError> {
        let rows = self
            .client
            .query(
                "SELECT a.attname::text, a.attnotnull, coalesce(a.attnum = ANY (i.indkey::int2[]), false)
                   FROM pg_attribute a
                   LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary
                  WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped",
                &[&oid],
            )
            .await?;
        let types: Vec<u32> = columns.iter().map(|c| c.1).collect();
        let mods: Vec<i32> = columns.iter().map(|c| c.2).collect();
        let names = self
            .client
            .query("SELECT format_type(t, m) FROM unnest($1::oid[], $2::int4[]) WITH ORDINALITY AS u(t, m, n) ORDER BY n", &[&types, &mods])
            .await?;
        Ok(columns
            .iter()
            .zip(names)
            .map(|((name, type_oid, typmod, key), type_name)| {
                let row = rows.iter().find(|r| r.get::<_, &str>(0) == name);
                let mut flags = 0;
                // pgoutput marks every column of a REPLICA IDENTITY FULL
                // table as key; the plugin marks the identity index's.
                if *key && identity != ReplicaIdentity::Full {
                    flags |= ColumnFlags::IDENTITY_KEY;
                }
                if row.is_some_and(|r| r.get::<_, bool>(2)) {
                    flags |= ColumnFlags::PRIMARY_KEY;
                }
                if row.is_some_and(|r| r.get::<_, bool>(1)) {
                    flags |= ColumnFlags::NOT_NULL;
                }
                ColumnMeta { name: name.clone(), type_oid: *type_oid, typmod: *typmod, type_name: type_name.get(0), flags }
            })
            .collect())
    }

    /// Everything test_decoding leaves out, for table `schema`.`name`; None
    /// when no such table exists now.
    pub async fn by_name(&self, schema: &str, name: &str) -> Result<Option<RelationMeta>, CatalogError> {
        let generated = if self.server_version >= 120000 { "a.attgenerated <> ''" } else { "false" };
        let sql = format!(
            "SELECT c.oid, c.relreplident::text, a.attname::text, a.atttypid, a.atttypmod, format_type(a.atttypid, a.atttypmod),
                    a.attnotnull, coalesce(a.attnum = ANY (pk.indkey::int2[]), false),
                    coalesce(a.attnum = ANY (ri.indkey::int2[]), false), {generated}
               FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
               LEFT JOIN pg_index pk ON pk.indrelid = c.oid AND pk.indisprimary
               LEFT JOIN pg_index ri ON ri.indrelid = c.oid AND ri.indisreplident
              WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind = 'r'
              ORDER BY a.attnum"
        );
        let rows = self.client.query(&sql, &[&schema, &name]).await?;
        let Some(first) = rows.first() else { return Ok(None) };
        let identity = first.get::<_, &str>(1).bytes().next().and_then(ReplicaIdentity::from_char).unwrap_or(ReplicaIdentity::Default);
        let generated = rows.iter().filter(|r| r.get::<_, bool>(9)).map(|r| r.get(2)).collect();
        let columns = rows
            .iter()
            .filter(|r| !r.get::<_, bool>(9))
            .map(|r| {
                let (primary, replident): (bool, bool) = (r.get(7), r.get(8));
                let key = match identity {
                    ReplicaIdentity::Default => primary,
                    ReplicaIdentity::Index => replident,
                    ReplicaIdentity::Full | ReplicaIdentity::Nothing => false,
                };
                let mut flags = 0;
                if key {
                    flags |= ColumnFlags::IDENTITY_KEY;
                }
                if primary {
                    flags |= ColumnFlags::PRIMARY_KEY;
                }
                if r.get::<_, bool>(6) {
                    flags |= ColumnFlags::NOT_NULL;
                }
                ColumnMeta { name: r.get(2), type_oid: r.get(3), typmod: r.get(4), type_name: r.get(5), flags }
            })
            .collect();
        Ok(Some(RelationMeta {
            oid: first.get(0),
            identity,
            schema: schema.to_owned(),
            name: name.to_owned(),
            columns,
            generated,
            selected: false,
            sent: false,
        }))
    }
}
