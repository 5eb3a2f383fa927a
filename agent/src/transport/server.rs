//! The applier's gRPC server: plumbing only. It checks the task and the
//! record format, turns the agent's streams into channels and the
//! destination's answers into messages, and lets one agent stream at a
//! time per task. What happens to the data is the [`Destination`]'s
//! business (the applier implements it).

use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use decant_proto::grpc::agent_message::Body as AgentBody;
use decant_proto::grpc::applier_message::Body as ApplierBody;
use decant_proto::grpc::applier_server::{Applier as ApplierRpc, ApplierServer};
use decant_proto::grpc::{
    Ack, AgentMessage, ApplierMessage, Claim, CopyChunk, CopyDone, HealthAck, HealthReport, Hello, MigrationPlan, PlanRequest,
    ResnapshotRequest, SchemaRequest, SequenceValue, TaskState, Welcome,
};
use decant_proto::{Lsn, FORMAT_VERSION};
use futures_util::FutureExt;
use tokio::sync::{mpsc, watch, Mutex};
use tokio_stream::wrappers::{ReceiverStream, WatchStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::{check_token, compression, MAX_MESSAGE_BYTES};
use crate::connect::wire::copy::Scan;

/// A piece of one range's copy data.
pub struct CopyPiece {
    /// Whole CopyData messages.
    pub data: Bytes,
    /// The range ends with it.
    pub last: bool,
    /// What the agent found in `data` while reading it, when the agent is
    /// in this process; data from the network is checked by the applier.
    pub framing: Option<Scan>,
}

/// One range's copy data, until a piece that is `last`.
pub type CopyChunks = Pin<Box<dyn Stream<Item = Result<CopyPiece, String>> + Send>>;

/// Batches of records from the agent, with their sequence numbers, until
/// the agent ends the stream (or it fails).
pub type Batches = mpsc::Receiver<Result<(u64, Bytes), Status>>;

/// What the destination does with each call. The server only carries the
/// calls; errors come back as the `Status` the agent should see.
#[tonic::async_trait]
pub trait Destination: Send + Sync + 'static {
    type Stream: ApplyStream;
    /// The task this destination serves; calls for another are refused.
    fn task_id(&self) -> &str;
    /// Records the task's `claim` (refused when it overlaps another task's),
    /// then stores `plan` (once), or with `None` reads the task's state.
    /// `mapping`: the agent's `migrate.map` in canonical form.
    async fn plan(&self, plan: Option<MigrationPlan>, claim: Option<Claim>, mapping: &str) -> Result<TaskState, Status>;
    /// Runs a schema section ("pre-data" or "post-data").
    async fn schema(&self, section: &str, workers: usize, sequences: &[SequenceValue]) -> Result<TaskState, Status>;
    /// Loads one copied range.
    async fn copy(&self, table_id: u32, range_id: u32, chunks: CopyChunks) -> Result<CopyDone, Status>;
    /// Restarts the unfinished copy from a new snapshot at `lsn`.
    async fn resnapshot(&self, lsn: Lsn) -> Result<TaskState, Status>;
    /// Records the agent's report on the task's health.
    async fn report(&self, report: &HealthReport) -> Result<(), Status>;
    /// Opens the apply stream for an agent that said `hello`.
    async fn open_stream(&self, hello: &Hello) -> Result<Self::Stream, Status>;
}

/// One agent's apply stream on the destination.
#[tonic::async_trait]
pub trait ApplyStream: Send + 'static {
    /// Where the agent is to resume: the last source commit the
    /// destination holds.
    fn resume_lsn(&self) -> Lsn;
    /// Applies `batches` until they end or something fails, reporting
    /// progress through `acks`.
    async fn run(&mut self, batches: Batches, acks: &Acks) -> Result<(), Status>;
    /// Called however the stream ended (`ended`: how), before another may
    /// start: leaves the destination settled, with nothing in flight that
    /// could commit later.
    async fn settle(&mut self, ended: &Result<(), Status>);
}

/// The acknowledgements of one stream. Acks are cumulative: only the
/// latest matters, so a watch channel carries them and a slow reader never
/// blocks the applier.
pub struct Acks(watch::Sender<Result<ApplierMessage, Status>>);

impl Acks {
    /// The destination durably committed every source transaction up to
    /// `committed`, and has applied the batches up to `sequence`.
    pub fn send(&self, committed: Lsn, sequence: u64) {
        let _ = self
            .0
            .send(Ok(ApplierMessage { body: Some(ApplierBody::Ack(Ack { committed_lsn: committed.0, applied_sequence: sequence })) }));
    }
}

/// The gRPC service around a [`Destination`]. Clones share the
/// destination, so `decant migrate` can hand one to its own agent.
pub struct Service<D> {
    destination: Arc<D>,
    /// Held while an agent streams, so a second agent is refused.
    busy: Arc<Mutex<()>>,
}

impl<D> Clone for Service<D> {
    fn clone(&self) -> Self {
        Service { destination: self.destination.clone(), busy: self.busy.clone() }
    }
}

impl<D: Destination> Service<D> {
    pub fn new(destination: D) -> Self {
        Service { destination: Arc::new(destination), busy: Arc::new(Mutex::new(())) }
    }

    fn check_task(&self, task_id: &str) -> Result<(), Status> {
        let served = self.destination.task_id();
        if task_id != served {
            return Err(Status::permission_denied(format!(
                "this applier serves task {served:?}, the agent is configured for task {task_id:?}"
            )));
        }
        Ok(())
    }
}

/// The full copy's call without the network: `decant migrate` hands its
/// agent this, so copy data goes from the source's session to the
/// destination's in memory, never encoded, framed or sent over loopback.
#[tonic::async_trait]
pub trait InProcessCopy: Send + Sync {
    async fn copy(&self, task_id: &str, table_id: u32, range_id: u32, chunks: CopyChunks) -> Result<CopyDone, Status>;
}

#[tonic::async_trait]
impl<D: Destination> InProcessCopy for Service<D> {
    async fn copy(&self, task_id: &str, table_id: u32, range_id: u32, chunks: CopyChunks) -> Result<CopyDone, Status> {
        self.check_task(task_id)?;
        guarded(self.destination.copy(table_id, range_id, chunks)).await
    }
}

fn check_format(version: u32) -> Result<(), Status> {
    if version != u32::from(FORMAT_VERSION) {
        return Err(Status::failed_precondition(format!(
            "record format version {version} is not supported by this applier (it reads version {FORMAT_VERSION}); upgrade the applier"
        )));
    }
    Ok(())
}

type Outbound = Pin<Box<dyn Stream<Item = Result<ApplierMessage, Status>> + Send>>;

/// Runs an RPC's work so that a panic (a defect) ends the call with an
/// error the agent reports, instead of a dropped connection that the agent
/// would take for a network failure and retry for hours.
async fn guarded<T>(work: impl std::future::Future<Output = Result<T, Status>>) -> Result<T, Status> {
    AssertUnwindSafe(work).catch_unwind().await.unwrap_or_else(|panic| {
        let what = panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned());
        Err(Status::internal(format!("the applier failed on a defect (please report it): {}", what.unwrap_or_default())))
    })
}

#[tonic::async_trait]
impl<D: Destination> ApplierRpc for Service<D> {
    type ReplicateStream = Outbound;

    async fn plan(&self, request: Request<PlanRequest>) -> Result<Response<TaskState>, Status> {
        let req = request.into_inner();
        self.check_task(&req.task_id)?;
        check_format(req.format_version)?;
        guarded(self.destination.plan(req.plan, req.claim, &req.mapping)).await.map(Response::new)
    }

    async fn schema(&self, request: Request<SchemaRequest>) -> Result<Response<TaskState>, Status> {
        let req = request.into_inner();
        self.check_task(&req.task_id)?;
        if req.section != "pre-data" && req.section != "post-data" {
            return Err(Status::invalid_argument(format!("unknown schema section {:?}", req.section)));
        }
        guarded(self.destination.schema(&req.section, req.workers as usize, &req.sequences)).await.map(Response::new)
    }

    async fn copy(&self, request: Request<Streaming<CopyChunk>>) -> Result<Response<CopyDone>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.ok_or_else(|| Status::invalid_argument("empty copy stream"))?;
        self.check_task(&first.task_id)?;
        if !first.framed {
            return Err(Status::failed_precondition(
                "the agent is older than this applier and sends the copy's data in another form: upgrade the agent to this applier's version",
            ));
        }
        let (table_id, range_id) = (first.table_id, first.range_id);
        let chunks: CopyChunks = Box::pin(
            tokio_stream::once(Ok(first))
                .chain(inbound)
                .map(|c| c.map(|c| CopyPiece { data: c.data, last: c.last, framing: None }).map_err(|s| s.message().to_owned())),
        );
        guarded(self.destination.copy(table_id, range_id, chunks)).await.map(Response::new)
    }

    async fn resnapshot(&self, request: Request<ResnapshotRequest>) -> Result<Response<TaskState>, Status> {
        let req = request.into_inner();
        self.check_task(&req.task_id)?;
        guarded(self.destination.resnapshot(Lsn(req.lsn))).await.map(Response::new)
    }

    async fn report(&self, request: Request<HealthReport>) -> Result<Response<HealthAck>, Status> {
        let req = request.into_inner();
        self.check_task(&req.task_id)?;
        // "": the report carries only the agent's controls.
        if !matches!(req.state.as_str(), "retrying" | "failed" | "") {
            return Err(Status::invalid_argument(format!("unknown task state {:?}", req.state)));
        }
        guarded(self.destination.report(&req)).await.map(|()| Response::new(HealthAck {}))
    }

    async fn replicate(&self, request: Request<Streaming<AgentMessage>>) -> Result<Response<Outbound>, Status> {
        let guard = self.busy.clone().try_lock_owned().map_err(|_| {
            Status::resource_exhausted(format!("task {}: another agent is already streaming to this applier", self.destination.task_id()))
        })?;
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await? {
            Some(AgentMessage { body: Some(AgentBody::Hello(h)) }) => h,
            _ => return Err(Status::invalid_argument("the stream must start with Hello")),
        };
        self.check_task(&hello.task_id)?;
        check_format(hello.format_version)?;
        let mut stream = guarded(self.destination.open_stream(&hello)).await?;
        tracing::info!(agent_version = %hello.agent_version, source_system = %hello.source_system_id, database = %hello.source_database, resume_lsn = %stream.resume_lsn(), "agent connected");
        let welcome = ApplierMessage {
            body: Some(ApplierBody::Welcome(Welcome {
                resume_lsn: stream.resume_lsn().0,
                format_version: u32::from(FORMAT_VERSION),
                applier_version: env!("CARGO_PKG_VERSION").to_owned(),
            })),
        };
        let (ack_tx, ack_rx) = watch::channel(Ok(welcome));
        let acks = Acks(ack_tx);
        let (end_tx, end_rx) = mpsc::channel::<Result<ApplierMessage, Status>>(1);
        tokio::spawn(async move {
            let _guard = guard;
            let (batches, reader) = read_batches(inbound);
            // A panic is a defect; it still ends this stream with an error
            // the agent reports, instead of a stream that just stops.
            let result = guarded(stream.run(batches, &acks)).await;
            reader.abort();
            match &result {
                Ok(()) => tracing::info!("agent ended the stream"),
                Err(e) if matches!(e.code(), tonic::Code::Cancelled | tonic::Code::Unknown) => {
                    tracing::info!(reason = %e.message(), "agent disconnected")
                }
                Err(e) => tracing::error!(error = %e.message(), "apply stream ended with an error"),
            }
            // However the stream ended, the destination is settled before
            // the next stream may start (the guard is held until then).
            stream.settle(&result).await;
            if let Err(e) = result {
                let _ = end_tx.send(Err(e)).await;
            }
        });
        let out: Outbound = Box::pin(WatchStream::new(ack_rx).merge(ReceiverStream::new(end_rx)));
        Ok(Response::new(out))
    }
}

/// Batches are read by their own task, so the apply loop can tell whether
/// more input is already waiting (then it keeps its group open).
fn read_batches(mut inbound: Streaming<AgentMessage>) -> (Batches, tokio::task::JoinHandle<()>) {
    let (batch_tx, batches) = mpsc::channel::<Result<(u64, Bytes), Status>>(4);
    let reader = tokio::spawn(async move {
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
    });
    (batches, reader)
}

/// Serves the applier on `listener` until `shutdown` resolves.
pub async fn serve<D: Destination>(
    listener: tokio::net::TcpListener,
    service: Service<D>,
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
