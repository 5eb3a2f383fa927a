//! Replication commands: IDENTIFY_SYSTEM and slot creation and removal.

use decant_proto::Lsn;

use super::client::{ReplicationClient, ReplicationError, Row};
use crate::connect::sql::quote_ident;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SystemIdentity {
    pub system_id: String,
    pub timeline: u32,
    pub wal_position: Lsn,
    pub database: Option<String>,
}

/// A slot just created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreatedSlot {
    pub name: String,
    /// Changes committed after this point are streamed.
    pub consistent_point: Lsn,
    /// With EXPORT_SNAPSHOT: valid for `SET TRANSACTION SNAPSHOT` while the
    /// creating connection stays open and idle.
    pub snapshot: Option<String>,
}

fn field<'r>(row: &'r Row, i: usize, what: &str) -> Result<&'r str, ReplicationError> {
    row.get(i).and_then(|v| v.as_deref()).ok_or_else(|| ReplicationError::Protocol(format!("{what}: missing column {i}")))
}

fn lsn(s: &str) -> Result<Lsn, ReplicationError> {
    s.parse().map_err(ReplicationError::Protocol)
}

impl ReplicationClient {
    pub async fn identify_system(&mut self) -> Result<SystemIdentity, ReplicationError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = rows.first().ok_or_else(|| ReplicationError::Protocol("IDENTIFY_SYSTEM returned no row".into()))?;
        Ok(SystemIdentity {
            system_id: field(row, 0, "IDENTIFY_SYSTEM")?.to_owned(),
            timeline: field(row, 1, "IDENTIFY_SYSTEM")?.parse().map_err(|_| ReplicationError::Protocol("bad timeline".into()))?,
            wal_position: lsn(field(row, 2, "IDENTIFY_SYSTEM")?)?,
            database: row.get(3).cloned().flatten(),
        })
    }

    /// `CREATE_REPLICATION_SLOT name LOGICAL plugin EXPORT_SNAPSHOT | NOEXPORT_SNAPSHOT`.
    pub async fn create_logical_slot(&mut self, name: &str, plugin: &str, export_snapshot: bool) -> Result<CreatedSlot, ReplicationError> {
        self.create_slot(name, false, plugin, export_snapshot).await
    }

    /// A slot dropped when this connection ends: used only for the
    /// snapshot it exports and the LSN that snapshot corresponds to.
    pub async fn create_temporary_slot(&mut self, name: &str, plugin: &str) -> Result<CreatedSlot, ReplicationError> {
        self.create_slot(name, true, plugin, true).await
    }

    async fn create_slot(
        &mut self,
        name: &str,
        temporary: bool,
        plugin: &str,
        export_snapshot: bool,
    ) -> Result<CreatedSlot, ReplicationError> {
        let sql = format!(
            "CREATE_REPLICATION_SLOT {}{} LOGICAL {} {}",
            quote_ident(name),
            if temporary { " TEMPORARY" } else { "" },
            quote_ident(plugin),
            if export_snapshot { "EXPORT_SNAPSHOT" } else { "NOEXPORT_SNAPSHOT" }
        );
        let rows = self.simple_query(&sql).await?;
        let row = rows.first().ok_or_else(|| ReplicationError::Protocol("CREATE_REPLICATION_SLOT returned no row".into()))?;
        Ok(CreatedSlot {
            name: field(row, 0, "CREATE_REPLICATION_SLOT")?.to_owned(),
            consistent_point: lsn(field(row, 1, "CREATE_REPLICATION_SLOT")?)?,
            snapshot: row.get(2).cloned().flatten(),
        })
    }

    /// `DROP_REPLICATION_SLOT name WAIT`.
    pub async fn drop_slot(&mut self, name: &str) -> Result<(), ReplicationError> {
        self.simple_query(&format!("DROP_REPLICATION_SLOT {} WAIT", quote_ident(name))).await.map(|_| ())
    }
}
