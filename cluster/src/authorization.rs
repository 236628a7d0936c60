//! The gate in front of every gRPC method of a TLS node: reads the caller's identity
//! from its verified certificate, asks the mesh's one table
//! ([`fogmesh_trust::access`]) whether that role may call the method, and refuses with
//! `PERMISSION_DENIED` naming the role and the method before any handler runs.
//!
//! An admitted call carries the caller's [`PeerIdentity`] in its request extensions,
//! so a handler can go further (ingest checks the sensor ids a sensor certificate
//! names; the cluster link checks the node name against the certificate's). Every
//! refusal is counted (`fogmesh_calls_denied_total{role,method}`) and every call
//! that changes the mesh, or was refused, leaves an audit line (target
//! `fogmesh::audit`: who, what, outcome; the log line's time is when).
//!
//! A node set `insecure = true` has no identities: the gate lets every call through
//! and audits changes as made by "unauthenticated" with the caller's address.

use std::task::{Context, Poll};

use fogmesh_trust::access::{self, Effect};
use fogmesh_trust::PeerIdentity;
use futures::future::BoxFuture;
use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::Status;
use tower::{Layer, Service};

use crate::status::ServiceError;
use crate::telemetry;

/// The audit outcome of a refused call.
const DENIED: &str = "permission_denied";

/// The tower layer that puts an [`Authorization`] in front of a node's services.
#[derive(Debug, Clone)]
pub struct AuthorizationLayer {
    tls: bool,
}

impl AuthorizationLayer {
    /// `tls`: whether the node serves mutual TLS (identities and roles are checked)
    /// or plaintext (`insecure = true`: everything passes, changes are audited).
    pub fn new(tls: bool) -> AuthorizationLayer {
        AuthorizationLayer { tls }
    }
}

impl<S> Layer<S> for AuthorizationLayer {
    type Service = Authorization<S>;

    fn layer(&self, inner: S) -> Authorization<S> {
        Authorization {
            inner,
            tls: self.tls,
        }
    }
}

/// See the module doc.
#[derive(Debug, Clone)]
pub struct Authorization<S> {
    inner: S,
    tls: bool,
}

/// Who made a call, for the audit line.
fn caller(identity: Option<&PeerIdentity>, request: &Request<Body>) -> String {
    match identity {
        Some(identity) => identity.to_string(),
        None => {
            let addr = request
                .extensions()
                .get::<TcpConnectInfo>()
                .and_then(TcpConnectInfo::remote_addr)
                .map_or_else(|| "an unknown address".to_string(), |a| a.to_string());
            format!("unauthenticated ({addr})")
        }
    }
}

impl<S> Service<Request<Body>> for Authorization<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let method = request.uri().path().to_string();
        let identity = if self.tls {
            let certified = request
                .extensions()
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(TlsConnectInfo::peer_certs)
                .ok_or_else(|| ServiceError::NoCertificate {
                    method: method.clone(),
                })
                .and_then(|certs| {
                    fogmesh_trust::client_identity(&certs).map_err(|source| {
                        ServiceError::NoIdentity {
                            method: method.clone(),
                            source: Box::new(source),
                        }
                    })
                });
            match certified {
                Ok(identity) => Some(identity),
                Err(refusal) => {
                    // The handshake already required a certificate of the mesh CA;
                    // one that names no fogmesh identity is refused here.
                    tracing::warn!(target: "fogmesh::audit", who = %caller(None, &request), %method, outcome = %DENIED, reason = %refusal, "refused");
                    let status = Status::from(refusal);
                    return Box::pin(async move { Ok(status.into_http()) });
                }
            }
        } else {
            None
        };
        let effect = match &identity {
            Some(identity) => match access::authorize(&method, identity) {
                Ok(rule) => rule.effect,
                Err(denied) => {
                    metrics::counter!(
                        telemetry::CALLS_DENIED,
                        "role" => identity.role.as_str(),
                        "method" => method.clone(),
                    )
                    .increment(1);
                    tracing::warn!(target: "fogmesh::audit", who = %identity, %method, outcome = %DENIED, "refused");
                    let status = Status::from(ServiceError::NotAllowed(denied));
                    return Box::pin(async move { Ok(status.into_http()) });
                }
            },
            None => access::rule_for(&method).map_or(Effect::Reads, |rule| rule.effect),
        };
        let who = (effect == Effect::Changes).then(|| caller(identity.as_ref(), &request));
        if let Some(identity) = identity {
            request.extensions_mut().insert(identity);
        }
        // The clone that was polled ready is the one that gets the call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let response = inner.call(request).await?;
            if let Some(who) = who {
                // An error answered before the body is a trailers-only response with
                // its status in the headers; a streamed outcome is in the trailers,
                // which the handler's own log line reports.
                let outcome = response
                    .headers()
                    .get("grpc-status")
                    .and_then(|code| code.to_str().ok())
                    .and_then(|code| code.parse::<i32>().ok())
                    .map_or("ok".to_string(), |code| {
                        format!("{:?}", tonic::Code::from_i32(code))
                    });
                tracing::info!(target: "fogmesh::audit", %who, %method, %outcome, "change");
            }
            Ok(response)
        })
    }
}
