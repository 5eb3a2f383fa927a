//! The destination side: applying records, and the gRPC server that
//! receives them from the agent.

pub mod apply;
pub mod cells;
pub mod commit;
pub mod fold;
pub mod merge;
pub mod migration;
pub mod progress;
pub mod rowwise;
pub mod stage;
pub mod statements;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::Config;
use crate::connect::{ConnInfo, ProcessEnv};
use crate::metrics::Metrics;
use crate::transport::server::{serve, ApplierService};
use crate::transport::TransportSettings;
use apply::{Applier, ApplySettings};

#[derive(Debug, thiserror::Error)]
pub enum ApplierRoleError {
    #[error("destination connection string: {0}")]
    ConnInfo(#[from] crate::connect::ConnInfoError),
    #[error("applier.listen {0:?}: {1}")]
    Listen(String, String),
    #[error("destination: {0}")]
    Destination(#[from] apply::ApplyError),
    #[error("{0}")]
    Transport(#[from] crate::transport::TransportError),
}

pub fn settings(config: &Config) -> ApplySettings {
    let a = &config.applier;
    ApplySettings {
        task_id: config.task_id.clone(),
        group_max_transactions: a.group_max_transactions,
        group_max_bytes: a.group_max_bytes,
        group_max_delay: Duration::from_millis(a.group_max_delay_ms),
        pipeline_depth: a.pipeline_depth,
        on_conflict: a.on_conflict,
        apply_truncate: a.apply_truncate,
        apply_messages: a.apply_messages,
        split_merges: a.split_merges,
    }
}

/// The gRPC service for `config`'s task. The destination is checked once
/// here, so a wrong password or database is reported at start instead of
/// on the first agent connection.
pub async fn service(config: &Config, destination: ConnInfo, metrics: Arc<Metrics>) -> Result<ApplierService, ApplierRoleError> {
    drop(Applier::open(&destination, settings(config), metrics.clone()).await?);
    Ok(ApplierService {
        task_id: config.task_id.clone(),
        destination,
        settings: settings(config),
        metrics,
        busy: Arc::new(tokio::sync::Mutex::new(())),
    })
}

/// Runs `decant applier` until `shutdown` turns true.
pub async fn run(config: Config, metrics: Arc<Metrics>, mut shutdown: watch::Receiver<bool>) -> Result<(), ApplierRoleError> {
    let destination = ConnInfo::parse(&config.destination.dsn, &ProcessEnv)?;
    let listen: std::net::SocketAddr = config
        .applier
        .listen
        .parse()
        .map_err(|e: std::net::AddrParseError| ApplierRoleError::Listen(config.applier.listen.clone(), e.to_string()))?;
    let transport = TransportSettings::from_config(&config)?;
    transport.check_server(&config.applier.listen)?;
    tracing::info!(task = %config.task_id, destination = %destination, "applier starting");
    let service = service(&config, destination, metrics).await?;
    let listener =
        tokio::net::TcpListener::bind(listen).await.map_err(|e| ApplierRoleError::Listen(config.applier.listen.clone(), e.to_string()))?;
    serve(listener, service, &transport, async move {
        let _ = shutdown.changed().await;
    })
    .await?;
    Ok(())
}
