//! The process's Prometheus recorder and the optional `GET /metrics` HTTP endpoint.
//!
//! `metrics` has one global recorder per process, and tests (and simulations) start
//! several nodes in one process, so the recorder is installed once, on first use, and
//! every node shares it: each node's `Telemetry.Metrics` and `/metrics` serve the same
//! text. The recorder must be installed before a node's actors start, because they bind
//! their counters when they start; `NodeServer::start` calls [`prometheus_handle`]
//! first for that reason.
//!
//! The HTTP endpoint is a few lines over a `TcpListener` rather than the exporter's
//! own listener, which would install a second recorder: it answers `GET /metrics` (and
//! `GET /`) with the text exposition format and closes the connection.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::shutdown::Shutdown;

/// Another recorder was installed in this process before fogmesh's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot install the Prometheus recorder: {reason}")]
pub struct MetricsError {
    reason: String,
}

/// How often histograms are drained into their rolling summaries; without upkeep they
/// grow without bound.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);
/// Longest request head the endpoint reads; a scrape request is a few hundred bytes.
const MAX_REQUEST_HEAD: usize = 8 << 10;
/// How long a scraper may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

static RECORDER: OnceLock<Result<PrometheusHandle, MetricsError>> = OnceLock::new();

/// The process's Prometheus handle, installing the recorder on first call.
pub fn prometheus_handle() -> Result<PrometheusHandle, MetricsError> {
    RECORDER
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).map_err(|e| MetricsError {
                reason: e.to_string(),
            })?;
            let upkeep = handle.clone();
            // A plain thread, not a task: it must outlive every runtime a test creates.
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(UPKEEP_INTERVAL);
                    upkeep.run_upkeep();
                })
                .map_err(|e| MetricsError {
                    reason: format!("cannot start the upkeep thread: {e}"),
                })?;
            Ok(handle)
        })
        .clone()
}

/// Serves `GET /metrics` on `listener` until `shutdown` fires.
///
/// Cancel safety: cancel-safe; dropping it stops accepting, answers in flight finish
/// on their own tasks.
pub(crate) async fn serve(listener: TcpListener, handle: PrometheusHandle, mut shutdown: Shutdown) {
    loop {
        let accepted = tokio::select! {
            () = shutdown.fired() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let handle = handle.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, &handle).await {
                        tracing::debug!(%peer, error = %e, "metrics scrape failed");
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "metrics endpoint cannot accept a connection"),
        }
    }
}

async fn answer(mut stream: TcpStream, handle: &PrometheusHandle) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buffer = [0u8; 1024];
    let read_head = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST_HEAD {
            let n = stream.read(&mut buffer).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buffer[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(REQUEST_TIMEOUT, read_head)
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "no request head in time")
        })??;
    let request_line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let mut parts = request_line.split(|b| *b == b' ');
    let (method, target) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let (status, content_type, body) = match (method, target) {
        (b"GET", b"/metrics" | b"/") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            handle.render(),
        ),
        (b"GET", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "try /metrics\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET is served\n".to_string(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
