//! The agent's end of the channel.

use decant_proto::grpc::agent_message::Body as AgentBody;
use decant_proto::grpc::applier_client::ApplierClient;
use decant_proto::grpc::applier_message::Body as ApplierBody;
use decant_proto::grpc::{AgentMessage, ApplierMessage, CopyChunk, CopyDone, Hello};
use decant_proto::Lsn;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::{InterceptedService, Interceptor};
use tonic::transport::{Channel, Endpoint};
use tonic::{Status, Streaming};

use super::server::{CopyPiece, InProcessCopy};
use super::{compression, TransportError, TransportSettings, MAX_MESSAGE_BYTES};

/// An open stream to the applier.
pub struct ApplierStream {
    /// Queue of messages to send; bounded, so a slow applier slows the agent.
    pub outbound: mpsc::Sender<AgentMessage>,
    pub inbound: Streaming<ApplierMessage>,
    /// Where the applier says to resume.
    pub resume_lsn: Lsn,
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("{0}")]
    Transport(#[from] TransportError),
    #[error("cannot reach the applier at {url}: {source}")]
    Connect { url: String, source: tonic::transport::Error },
    #[error("applier: {}", .0.message())]
    Status(Status),
    #[error("applier: the stream ended before Welcome")]
    NoWelcome,
}

impl StreamError {
    /// A lost or refused connection, as opposed to an answer.
    pub fn is_connection_loss(&self) -> bool {
        match self {
            StreamError::Connect { .. } | StreamError::NoWelcome => true,
            StreamError::Status(s) => matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown),
            StreamError::Transport(_) => false,
        }
    }
}

/// The applier's gRPC client, with the shared token on every request.
pub type Client = ApplierClient<InterceptedService<Channel, TokenInterceptor>>;

#[derive(Clone)]
pub struct TokenInterceptor(Option<MetadataValue<Ascii>>);

impl Interceptor for TokenInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert("authorization", t.clone());
        }
        Ok(req)
    }
}

/// Connects to the applier.
pub async fn connect(url: &str, settings: &TransportSettings) -> Result<Client, StreamError> {
    let mut endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| TransportError::Url(url.to_owned(), e.to_string()))?
        .connect_timeout(std::time::Duration::from_secs(10))
        .http2_keep_alive_interval(std::time::Duration::from_secs(20))
        .keep_alive_timeout(std::time::Duration::from_secs(20))
        // Copy data flows in large messages: wide windows keep the pipe full.
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(32 << 20));
    if url.starts_with("https://") {
        let host = endpoint.uri().host().unwrap_or_default().to_owned();
        endpoint = endpoint.tls_config(settings.client_tls(&host)).map_err(TransportError::from)?;
    }
    let channel = endpoint.connect().await.map_err(|source| StreamError::Connect { url: url.to_owned(), source })?;
    let token: Option<MetadataValue<Ascii>> = match &settings.token {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse()
                .map_err(|_| TransportError::Url(url.to_owned(), "the token contains characters not allowed in a header".into()))?,
        ),
        None => None,
    };
    let mut client = ApplierClient::with_interceptor(channel, TokenInterceptor(token))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    if let Some(c) = compression(settings) {
        client = client.send_compressed(c).accept_compressed(c);
    }
    Ok(client)
}

/// Where the full copy's ranges go.
#[derive(Clone)]
pub enum CopyLink {
    /// The applier's `Copy` call.
    Remote(Client),
    /// The applier in this process (`decant migrate`).
    InProcess(Arc<dyn InProcessCopy>),
}

impl CopyLink {
    /// The applier in this process when there is one, else `client`.
    pub fn new(client: &Client, settings: &TransportSettings) -> Self {
        match &settings.in_process {
            Some(local) => CopyLink::InProcess(local.clone()),
            None => CopyLink::Remote(client.clone()),
        }
    }

    /// Sends one range's `chunks` and returns the applier's answer.
    /// Chunks that end without a `last` one abort the range.
    pub async fn copy(self, task_id: String, table_id: u32, range_id: u32, chunks: mpsc::Receiver<CopyPiece>) -> Result<CopyDone, Status> {
        match self {
            CopyLink::Remote(mut client) => {
                let first = CopyChunk { table_id, range_id, task_id, data: Bytes::new(), last: false, framed: true };
                let rest = ReceiverStream::new(chunks).map(|p| CopyChunk { data: p.data, last: p.last, ..Default::default() });
                client.copy(tokio_stream::once(first).chain(rest)).await.map(|r| r.into_inner())
            }
            CopyLink::InProcess(local) => local.copy(&task_id, table_id, range_id, Box::pin(ReceiverStream::new(chunks).map(Ok))).await,
        }
    }
}

/// Connects, says Hello, and waits for Welcome.
pub async fn open(url: &str, settings: &TransportSettings, hello: Hello, queue: usize) -> Result<ApplierStream, StreamError> {
    let mut client = connect(url, settings).await?;
    let (tx, rx) = mpsc::channel(queue.max(1));
    tx.send(AgentMessage { body: Some(AgentBody::Hello(hello)) }).await.map_err(|_| StreamError::NoWelcome)?;
    let mut inbound = client.replicate(ReceiverStream::new(rx)).await.map_err(StreamError::Status)?.into_inner();
    match inbound.message().await {
        Ok(Some(ApplierMessage { body: Some(ApplierBody::Welcome(w)) })) => {
            Ok(ApplierStream { outbound: tx, inbound, resume_lsn: Lsn(w.resume_lsn) })
        }
        Ok(_) => Err(StreamError::NoWelcome),
        Err(s) => Err(StreamError::Status(s)),
    }
}

/// Tells the applier how the task is doing after a failure ("retrying" or
/// "failed"), for `decant status`. Best effort: an applier that cannot be
/// reached within a few seconds (often the failure itself) is not told.
pub async fn report(url: &str, settings: &TransportSettings, report: decant_proto::grpc::HealthReport) {
    let send = async {
        let mut client = connect(url, settings).await?;
        client.report(report).await.map_err(StreamError::Status)
    };
    match tokio::time::timeout(std::time::Duration::from_secs(5), send).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "could not report the task's health to the applier"),
        Err(_) => tracing::debug!("could not report the task's health to the applier: timed out"),
    }
}
