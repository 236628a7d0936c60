//! The process's Prometheus recorder and the optional `GET /metrics` HTTP endpoint.
//!
//! `metrics` has one global recorder per process, and tests (and simulations) start
//! several nodes in one process, so the recorder is installed once, on first use, and
//! every node shares it: each node's `Telemetry.Metrics` and `/metrics` serve the same
//! text. The recorder must be installed before a node's actors start, because they bind
//! their counters when they start; `NodeServer::start` calls [`prometheus_handle`]
//! first for that reason.
//!
//! The HTTP endpoint is hyper's HTTP/1.1 server over the node's own `TcpListener`
//! rather than the exporter's listener, which would install a second recorder and bind
//! an address of its own that no node could stop: it answers `GET /metrics` (and
//! `GET /`) with the text exposition format, one request per connection.

use std::convert::Infallible;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Another recorder was installed in this process before fogmesh's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot install the Prometheus recorder: {reason}")]
pub struct MetricsError {
    reason: String,
}

/// How often histograms are drained into their rolling summaries; without upkeep they
/// grow without bound.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);
/// Longest request head the endpoint reads (hyper's smallest buffer); a scrape request
/// is a few hundred bytes.
const MAX_REQUEST_HEAD: usize = 8 << 10;
/// How long a scraper may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const EXPOSITION: &str = "text/plain; version=0.0.4; charset=utf-8";
const PLAIN: &str = "text/plain; charset=utf-8";

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

/// Serves `GET /metrics` on `listener` until `shutdown` is cancelled.
///
/// Cancel safety: cancel-safe; dropping it stops accepting, answers in flight finish
/// on their own tasks.
pub(crate) async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    shutdown: CancellationToken,
) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(REQUEST_TIMEOUT)
        .max_buf_size(MAX_REQUEST_HEAD)
        // A scraper comes back every few seconds at most; an idle connection held
        // open between scrapes would only cost a task.
        .keep_alive(false);
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let handle = handle.clone();
                let connection = http.serve_connection(
                    TokioIo::new(stream),
                    service_fn(move |request| {
                        let response = answer(&request, &handle);
                        async move { Ok::<_, Infallible>(response) }
                    }),
                );
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(%peer, error = %e, "metrics scrape failed");
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "metrics endpoint cannot accept a connection"),
        }
    }
}

fn answer<B>(request: &Request<B>, handle: &PrometheusHandle) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics" | "/") => (StatusCode::OK, EXPOSITION, handle.render()),
        (&Method::GET, _) => (StatusCode::NOT_FOUND, PLAIN, "try /metrics\n".to_string()),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            "only GET is served\n".to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Sends `request` on a fresh connection and reads the answer to its end: the
    /// endpoint closes each connection after one answer.
    async fn exchange(addr: std::net::SocketAddr, request: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connects");
        stream
            .write_all(request.as_bytes())
            .await
            .expect("the request is sent");
        let mut response = String::new();
        tokio::time::timeout(
            Duration::from_secs(10),
            stream.read_to_string(&mut response),
        )
        .await
        .expect("the endpoint answers and closes in time")
        .expect("the answer is text");
        response
    }

    #[tokio::test]
    async fn serves_the_exposition_on_get_metrics_and_refuses_the_rest() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            metrics::counter!("fogmesh_test_scrapes_total").increment(3);
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let addr = listener.local_addr().expect("bound");
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(listener, handle, shutdown.clone()));

        for target in ["/metrics", "/"] {
            let response = exchange(
                addr,
                &format!("GET {target} HTTP/1.1\r\nHost: fogmesh\r\n\r\n"),
            )
            .await;
            assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
            let lower = response.to_ascii_lowercase();
            assert!(
                lower.contains(&format!("content-type: {EXPOSITION}\r\n")),
                "{response}"
            );
            assert!(lower.contains("connection: close\r\n"), "{response}");
            assert!(
                response.contains("fogmesh_test_scrapes_total 3"),
                "{response}"
            );
        }
        let missing = exchange(addr, "GET /nope HTTP/1.1\r\nHost: fogmesh\r\n\r\n").await;
        assert!(
            missing.starts_with("HTTP/1.1 404 Not Found\r\n"),
            "{missing}"
        );
        assert!(missing.ends_with("\r\n\r\ntry /metrics\n"), "{missing}");
        let post = exchange(
            addr,
            "POST /metrics HTTP/1.1\r\nHost: fogmesh\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        assert!(
            post.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{post}"
        );
        assert!(post.ends_with("\r\n\r\nonly GET is served\n"), "{post}");

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the endpoint stops when cancelled")
            .expect("the endpoint task does not panic");
    }
}
