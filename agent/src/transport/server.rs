//! The applier's gRPC server: one agent stream at a time per task.

use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use decant_proto::grpc::agent_message::Body as AgentBody;
use decant_proto::grpc::applier_message::Body as ApplierBody;
use decant_proto::grpc::applier_server::{Applier as ApplierRpc, ApplierServer};
use decant_proto::grpc::{
    Ack, AgentMessage, ApplierMessage, CopyChunk, CopyDone, PlanRequest, ResnapshotRequest, SchemaRequest, TaskState, Welcome,
};
use decant_proto::FORMAT_VERSION;
use futures_util::FutureExt;
use tokio::sync::{mpsc, watch, Mutex};
use tokio_stream::wrappers::{ReceiverStream, WatchStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::{check_token, compression, MAX_MESSAGE_BYTES};
use crate::applier::apply::{Applier, ApplyError, ApplySettings};
use crate::applier::migration::{self, MigrationError};
use crate::connect::ConnInfo;
use crate::metrics::Metrics;

pub struct ApplierService {
    pub task_id: String,
    pub destination: ConnInfo,
    pub settings: ApplySettings,
    pub metrics: Arc<Metrics>,
    /// Held while an agent streams, so a second agent is refused.
    pub busy: Arc<Mutex<()>>,
}

type Outbound = Pin<Box<dyn Stream<Item = Result<ApplierMessage, Status>> + Send>>;

fn status_of(e: &ApplyError) -> Status {
    let message = crate::error::report(e);
    match e {
        ApplyError::Corrupt { .. } => Status::data_loss(message),
        _ if e.is_connection_loss() => Status::unavailable(message),
        ApplyError::MissingTable { .. } | ApplyError::NoIdentity { .. } | ApplyError::MissingRow { .. } => {
            Status::failed_precondition(message)
        }
        _ => Status::aborted(message),
    }
}

fn migration_status(e: &MigrationError) -> Status {
    let message = crate::error::report(e);
    tracing::error!(error = %message, "migration step failed");
    if e.is_connection_loss() {
        Status::unavailable(message)
    } else if e.is_precondition() {
        Status::failed_precondition(message)
    } else {
        Status::aborted(message)
    }
}

impl ApplierService {
    fn check_task(&self, task_id: &str) -> Result<(), Status> {
        if task_id != self.task_id {
            return Err(Status::permission_denied(format!(
                "this applier serves task {:?}, the agent is configured for task {:?}",
                self.task_id, task_id
            )));
        }
        Ok(())
    }
}

/// Runs an RPC's work so that a panic (a defect) ends the call with an
/// error the agent reports, instead of a dropped connection that the agent
/// would take for a network failure and retry for hours.
async fn guarded<T>(work: impl std::future::Future<Output = Result<T, Status>>) -> Result<T, Status> {
    AssertUnwindSafe(work).catch_unwind().await.unwrap_or_else(|panic| {
        let what = panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned());
        Err(Status::internal(format!("the applier failed on a defect (please report it): {}", what.unwrap_or_default())))
    })
}

fn ack(committed: decant_proto::Lsn, sequence: u64) -> Result<ApplierMessage, Status> {
    Ok(ApplierMessage { body: Some(ApplierBody::Ack(Ack { committed_lsn: committed.0, applied_sequence: sequence })) })
}

#[tonic::async_trait]
impl ApplierRpc for ApplierService {
    type ReplicateStream = Outbound;

    async fn plan(&self, request: Request<PlanRequest>) -> Result<Response<TaskState>, Status> {
        let req = request.into_inner();
        self.check_task(&req.task_id)?;
        if req.format_version != u32::from(FORMAT_VERSION) {
            return Err(Status::failed_precondition(format!(
                "record format version {} is not supported by this applier (it reads version {FORMAT_VERSION}); upgrade the applier",
                req.format_version
            )));
        }
        guarded(async {
            let state = match req.plan {
                Some(plan) => migration::plan(&self.destination, &self.task_id, plan).await,
                None => migration::state(&self.destination, &self.task_id).await,
            };
            state.map(Response::new).map_err(|e| migration_status(&e))
        })
        .await
    }

    async fn schema(&self, request: Request<SchemaRequest>) -> Result<Response<TaskState>, Status> {
        let req = request.into_inner();
        self.check_task(&req.task_id)?;
        if req.section != "pre-data" && req.section != "post-data" {
            return Err(Status::invalid_argument(format!("unknown schema section {:?}", req.section)));
        }
        guarded(async {
            migration::run_schema(&self.destination, &self.task_id, &req.section, req.workers as usize, &req.sequences)
                .await
                .map(Response::new)
                .map_err(|e| migration_status(&e))
        })
        .await
    }

    async fn copy(&self, request: Request<Streaming<CopyChunk>>) -> Result<Response<CopyDone>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.ok_or_else(|| Status::invalid_argument("empty copy stream"))?;
        self.check_task(&first.task_id)?;
        let chunks = inbound.map(|c| c.map(|c| (c.data, c.last)).map_err(|s| s.message().to_owned()));
        guarded(async {
            migration::copy_range(&self.destination, &self.task_id, first.table_id, first.range_id, (first.data, first.last), chunks)
                .await
                .map(Response::new)
                .map_err(|e| migration_status(&e))
        })
        .await
    }

    async fn resnapshot(&self, request: Request<ResnapshotRequest>) -> Result<Response<TaskState>, Status> {
        let req = request.into_inner();
        self.check_task(&req.task_id)?;
        guarded(async {
            migration::resnapshot(&self.destination, &self.task_id, decant_proto::Lsn(req.lsn))
                .await
                .map(Response::new)
                .map_err(|e| migration_status(&e))
        })
        .await
    }

    async fn replicate(&self, request: Request<Streaming<AgentMessage>>) -> Result<Response<Outbound>, Status> {
        let guard = self.busy.clone().try_lock_owned().map_err(|_| {
            Status::resource_exhausted(format!("task {}: another agent is already streaming to this applier", self.task_id))
        })?;
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await? {
            Some(AgentMessage { body: Some(AgentBody::Hello(h)) }) => h,
            _ => return Err(Status::invalid_argument("the stream must start with Hello")),
        };
        self.check_task(&hello.task_id)?;
        if hello.format_version != u32::from(FORMAT_VERSION) {
            return Err(Status::failed_precondition(format!(
                "record format version {} is not supported by this applier (it reads version {FORMAT_VERSION}); upgrade the applier",
                hello.format_version
            )));
        }
        let mut applier = Applier::open(&self.destination, self.settings.clone(), self.metrics.clone()).await.map_err(|e| status_of(&e))?;
        tracing::info!(agent_version = %hello.agent_version, source_system = %hello.source_system_id, database = %hello.source_database, resume_lsn = %applier.resume_lsn(), "agent connected");
        let welcome = ApplierMessage {
            body: Some(ApplierBody::Welcome(Welcome {
                resume_lsn: applier.resume_lsn().0,
                format_version: u32::from(FORMAT_VERSION),
                applier_version: env!("CARGO_PKG_VERSION").to_owned(),
            })),
        };
        // Acks are cumulative: only the latest matters, so a watch channel
        // carries them and a slow reader never blocks the applier.
        let (ack_tx, ack_rx) = watch::channel(Ok(welcome));
        let (end_tx, end_rx) = mpsc::channel::<Result<ApplierMessage, Status>>(1);
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let _guard = guard;
            // A panic is a defect; it still ends this stream with an error
            // the agent reports, instead of a stream that just stops.
            let result = guarded(run(&mut applier, inbound, &ack_tx, &metrics)).await;
            match &result {
                Ok(()) => tracing::info!("agent ended the stream"),
                Err(e) if matches!(e.code(), tonic::Code::Cancelled | tonic::Code::Unknown) => {
                    tracing::info!(reason = %e.message(), "agent disconnected")
                }
                Err(e) => {
                    metrics.errors.inc();
                    tracing::error!(error = %e.message(), "apply stream ended with an error");
                }
            }
            // However the stream ended, the destination is settled before
            // the next stream may start (the guard is held until then): a
            // commit in flight finishes, an open group is rolled back. The
            // next stream then reads a position no commit will pass later.
            applier.abort().await;
            if let Err(e) = result {
                let _ = end_tx.send(Err(e)).await;
            }
        });
        let acks = WatchStream::new(ack_rx);
        let out: Outbound = Box::pin(acks.merge(ReceiverStream::new(end_rx)));
        Ok(Response::new(out))
    }
}

/// Applies batches until the agent ends the stream or an error occurs.
async fn run(
    applier: &mut Applier,
    mut inbound: Streaming<AgentMessage>,
    acks: &watch::Sender<Result<ApplierMessage, Status>>,
    metrics: &Metrics,
) -> Result<(), Status> {
    // Batches are read by their own task so the apply loop can tell
    // whether more input is already waiting (then it keeps the group open).
    let (batch_tx, mut batches) = mpsc::channel::<Result<(u64, Bytes), Status>>(4);
    let reader = {
        tokio::spawn(async move {
            loop {
                let item = match inbound.message().await {
                    Ok(Some(AgentMessage { body: Some(AgentBody::Batch(b)) })) => Ok((b.sequence, b.records)),
                    Ok(Some(_)) => Err(Status::invalid_argument("unexpected message after Hello")),
                    Ok(None) => break,
                    Err(e) => Err(e),
                };
                let stop = item.is_err();
                if batch_tx.send(item).await.is_err() || stop {
                    break;
                }
            }
        })
    };
    let mut applied_sequence = 0;
    let mut durable = applier.resume_lsn();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let commit_ended = applier.commit_ended();
    let result = loop {
        tokio::select! {
            next = batches.recv() => {
                let Some(next) = next else { break Ok(()) };
                let (sequence, records) = match next {
                    Ok(b) => b,
                    Err(e) => break Err(e),
                };
                if let Err(e) = applier.apply_batch(sequence, &records).await {
                    break Err(status_of(&e));
                }
                applied_sequence = sequence;
                if batches.is_empty() {
                    if let Err(e) = applier.flush().await {
                        break Err(status_of(&e));
                    }
                }
                let _ = acks.send(ack(durable, applied_sequence));
            }
            // A group kept open while the previous one committed is
            // committed now if no input is waiting.
            _ = commit_ended.notified() => {
                if batches.is_empty() {
                    if let Err(e) = applier.flush().await {
                        break Err(status_of(&e));
                    }
                }
            }
            _ = tick.tick() => {
                if let Err(e) = applier.flush().await {
                    break Err(status_of(&e));
                }
                if applier.has_undurable_commits() {
                    match applier.durable_lsn().await {
                        Ok(lsn) if lsn != durable => {
                            durable = lsn;
                            metrics.applied_lsn.set(lsn.0);
                            let _ = acks.send(ack(durable, applied_sequence));
                        }
                        Ok(_) => {}
                        Err(e) => break Err(status_of(&e)),
                    }
                }
            }
        }
    };
    reader.abort();
    result
}

/// Serves the applier on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: ApplierService,
    transport: &super::TransportSettings,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), super::TransportError> {
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        // Copy data flows in large messages: wide windows keep the pipe full.
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(32 << 20));
    if let Some(tls) = transport.server_tls()? {
        builder = builder.tls_config(tls)?;
    }
    let token = transport.token.clone();
    let mut server = ApplierServer::new(service).max_decoding_message_size(MAX_MESSAGE_BYTES);
    if let Some(c) = compression(transport) {
        server = server.accept_compressed(c).send_compressed(c);
    }
    let server = tonic::service::interceptor::InterceptedService::new(server, move |req: Request<()>| check_token(req, token.as_deref()));
    let listen = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(%listen, tls = transport.server_tls_enabled(), token = transport.token.is_some(), "applier listening");
    builder.add_service(server).serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown).await?;
    Ok(())
}
