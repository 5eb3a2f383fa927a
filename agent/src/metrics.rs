//! Prometheus metrics: counters and gauges on atomics, rendered in the text
//! exposition format on `GET /metrics` by a minimal HTTP endpoint.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn set<T: TryInto<i64>>(&self, v: T) {
        self.0.store(v.try_into().unwrap_or(i64::MAX), Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Every metric of both roles; each role updates the ones it owns.
#[derive(Default)]
pub struct Metrics {
    // agent
    pub records_received: Counter,
    pub bytes_received: Counter,
    pub batches_sent: Counter,
    pub source_wal_end: Gauge,
    pub confirmed_lsn: Gauge,
    pub lag_bytes: Gauge,
    pub lag_seconds: Gauge,
    // applier
    pub batches: Counter,
    pub batch_bytes: Counter,
    pub changes: Counter,
    pub transactions: Counter,
    pub destination_commits: Counter,
    /// Merges split over the two destination connections (split_merges).
    pub split_merges: Counter,
    pub group_size: Gauge,
    pub applied_lsn: Gauge,
    pub source_commit_time: Gauge,
    pub missing_rows: Counter,
    /// Changes not applied by `applier.operations`.
    pub skipped_changes: Counter,
    /// DDL statements captured on the source, applied or skipped.
    pub ddl_applied: Counter,
    pub ddl_skipped: Counter,
    // full copy (agent)
    pub copy_rows: Counter,
    pub copy_bytes: Counter,
    // both
    pub errors: Counter,
    pub retries: Counter,
    /// The throttle in force, in the order of [`THROTTLE_GAUGES`] (0 =
    /// unlimited).
    pub throttle: [Gauge; 5],
}

/// The throttle gauges: name and help, in the order of `Metrics::throttle`.
pub const THROTTLE_GAUGES: [(&str, &str); 5] = [
    ("throttle_copy_max_rows_per_second", "migrate.max_rows_per_second in force (0 = unlimited): rows/s the full copy reads."),
    ("throttle_copy_max_mb_per_second", "migrate.max_mb_per_second in force (0 = unlimited): MB/s of COPY data the full copy reads."),
    (
        "throttle_copy_max_source_queries_per_second",
        "migrate.max_source_queries_per_second in force (0 = unlimited): queries/s the migration phases send to the source.",
    ),
    ("throttle_apply_max_rows_per_second", "applier.max_rows_per_second in force (0 = unlimited): changes/s the applier applies."),
    ("throttle_apply_max_mb_per_second", "applier.max_mb_per_second in force (0 = unlimited): MB/s of change records the applier applies."),
];

impl Metrics {
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP decant_{name} {help}\n# TYPE decant_{name} counter\ndecant_{name} {v}");
        };
        counter("records_received_total", "Records received from the source slot.", self.records_received.get());
        counter("bytes_received_total", "Record bytes received from the source slot.", self.bytes_received.get());
        counter("batches_sent_total", "Record batches sent to the applier.", self.batches_sent.get());
        counter("batches_applied_total", "Record batches applied.", self.batches.get());
        counter("batch_bytes_applied_total", "Bytes of record batches applied.", self.batch_bytes.get());
        counter("changes_applied_total", "Row changes applied to the destination.", self.changes.get());
        counter("transactions_applied_total", "Source transactions applied.", self.transactions.get());
        counter("destination_commits_total", "Destination transactions committed.", self.destination_commits.get());
        counter("split_merges_total", "Merges of a table split over two destination connections.", self.split_merges.get());
        counter("missing_rows_total", "UPDATEs and DELETEs that found no destination row.", self.missing_rows.get());
        counter(
            "skipped_changes_total",
            "Changes not applied because applier.operations excludes their operation for the table.",
            self.skipped_changes.get(),
        );
        counter("ddl_applied_total", "DDL statements captured on the source and applied to the destination.", self.ddl_applied.get());
        counter(
            "ddl_skipped_total",
            "DDL statements captured on the source and skipped (migrate.ddl = skip, or decant skip-ddl).",
            self.ddl_skipped.get(),
        );
        counter("copy_rows_total", "Rows copied by the full copy.", self.copy_rows.get());
        counter("copy_bytes_total", "COPY data bytes moved by the full copy.", self.copy_bytes.get());
        counter("errors_total", "Errors (each retried or fatal).", self.errors.get());
        counter("retries_total", "Reconnection attempts.", self.retries.get());
        let mut gauge = |name: &str, help: &str, v: i64| {
            let _ = writeln!(out, "# HELP decant_{name} {help}\n# TYPE decant_{name} gauge\ndecant_{name} {v}");
        };
        gauge("source_wal_end_lsn", "Source WAL end seen on the stream.", self.source_wal_end.get());
        gauge("confirmed_lsn", "Source position confirmed to the slot.", self.confirmed_lsn.get());
        gauge("lag_bytes", "Source WAL end minus the confirmed position.", self.lag_bytes.get());
        gauge("lag_seconds", "Age, in whole seconds, of the last source commit when the destination committed it.", self.lag_seconds.get());
        gauge("applied_lsn", "End LSN of the last source transaction committed on the destination.", self.applied_lsn.get());
        gauge("last_group_transactions", "Source transactions in the last destination transaction.", self.group_size.get());
        for ((name, help), g) in THROTTLE_GAUGES.iter().zip(&self.throttle) {
            gauge(name, help, g.get());
        }
        out
    }
}

/// Serves `GET /metrics` on `listen` until the task is dropped.
pub async fn serve(listen: std::net::SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(listen).await?;
    tracing::info!(%listen, "metrics endpoint listening");
    Ok(tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else { continue };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                // Read the whole request head (it may arrive in pieces)
                // before answering, or closing would reset the client.
                let mut request = Vec::new();
                let mut chunk = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
                    match socket.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&chunk[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&request);
                let (status, body) = if line.starts_with("GET /metrics ") || line.starts_with("GET /metrics?") {
                    ("200 OK", metrics.render())
                } else {
                    ("404 Not Found", "only /metrics is served here\n".to_owned())
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
            });
        }
    }))
}
