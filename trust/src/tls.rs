//! Mutual TLS for every port of a node and every client of one.
//!
//! A [`MeshTls`] is a peer's certificate, key and the mesh CA it trusts. A node
//! serves with [`MeshTls::server_config`]: the handshake requires a client
//! certificate that chains to the mesh CA, so a plaintext client, one without a
//! certificate and one from another CA never reach a handler. Clients dial with
//! [`MeshTls::connect`]: the server must present a certificate of the same CA whose
//! role is a node's. The address dialled is not compared with the certificate's
//! name, because nodes are dialled by address (`seeds`, advertised addresses) and
//! a plant's addresses change; where the name matters (the cluster link), the caller
//! compares the identity [`MeshTls::connect`] returns with the name the peer claims.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::net::{TcpSocket, TcpStream};
use tonic::transport::{Certificate, Channel, Endpoint, Identity, ServerTlsConfig, Uri};

use crate::authority::read;
use crate::{PeerIdentity, TrustError};

/// Longest a TLS handshake may take before the server drops the connection, so a
/// peer that opens sockets and never finishes cannot hold them.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a peer's TLS files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The mesh CA certificate (`ca.pem`).
    pub ca: PathBuf,
    /// This peer's certificate.
    pub cert: PathBuf,
    /// This peer's private key.
    pub key: PathBuf,
}

/// A peer's TLS identity and the mesh CA it trusts. Cheap to clone.
#[derive(Clone)]
pub struct MeshTls {
    inner: Arc<Inner>,
}

struct Inner {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
    identity: PeerIdentity,
    client: Arc<ClientConfig>,
    /// Checks that a certificate chains to the mesh CA; signatures reuse it.
    verifier: Arc<dyn ClientCertVerifier>,
}

impl fmt::Debug for MeshTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The private key is never printed.
        f.debug_struct("MeshTls")
            .field("identity", &self.inner.identity)
            .finish_non_exhaustive()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

impl MeshTls {
    /// Loads and checks a peer's files: the certificate must chain to the CA and
    /// name a peer and role, and the key must be readable.
    pub fn load(files: &TlsFiles) -> Result<MeshTls, TrustError> {
        MeshTls::from_pem(
            &read(&files.ca)?,
            &read(&files.cert)?,
            &read(&files.key)?,
            files,
        )
    }

    /// [`MeshTls::load`] from PEM text already in memory; `files` names them in errors.
    pub fn from_pem(
        ca_pem: &str,
        cert_pem: &str,
        key_pem: &str,
        files: &TlsFiles,
    ) -> Result<MeshTls, TrustError> {
        let roots = Arc::new(roots(ca_pem, &files.ca)?);
        let chain = certificates(cert_pem, &files.cert)?;
        let key =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|_| TrustError::NoPem {
                path: files.key.clone(),
                what: "private key",
            })?;
        let identity = PeerIdentity::from_der(&chain[0], &files.cert.display().to_string())?;
        // Every certificate the CA issues is good for client authentication, so the
        // client verifier checks the chain, validity and usage of any of them.
        let unusable_roots = |source| TrustError::Roots {
            ca: files.ca.clone(),
            source,
        };
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(unusable_roots)?;
        verifier
            .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
            .map_err(|source| TrustError::NotIssuedByCa {
                path: files.cert.clone(),
                ca: files.ca.clone(),
                source,
            })?;
        let server_verifier = WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(unusable_roots)?;
        let tls_error = |source| TrustError::Tls {
            what: format!("{} with {}", files.cert.display(), files.key.display()),
            source,
        };
        let mut client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(tls_error)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(MeshServerVerifier {
                inner: server_verifier,
            }))
            .with_client_auth_cert(chain, key)
            .map_err(tls_error)?;
        client.alpn_protocols = vec![b"h2".to_vec()];
        Ok(MeshTls {
            inner: Arc::new(Inner {
                ca_pem: ca_pem.to_string(),
                cert_pem: cert_pem.to_string(),
                key_pem: key_pem.to_string(),
                identity,
                client: Arc::new(client),
                verifier,
            }),
        })
    }

    /// Client settings for a server outside the mesh, an MQTT broker: its certificate
    /// must chain to the CA in `ca` (the mesh CA where `ca` is `None`) and name the
    /// host dialled, as any TLS client checks; this peer's certificate is presented
    /// for mutual TLS.
    pub fn outside_client(&self, ca: Option<&Path>) -> Result<ClientConfig, TrustError> {
        let roots = match ca {
            Some(path) => roots(&read(path)?, path)?,
            None => roots(&self.inner.ca_pem, Path::new("the mesh CA"))?,
        };
        let tls_error = |source| TrustError::Tls {
            what: "the node's certificate for a broker".into(),
            source,
        };
        let chain = certificates(&self.inner.cert_pem, Path::new("the node's certificate"))?;
        let key = PrivateKeyDer::from_pem_slice(self.inner.key_pem.as_bytes()).map_err(|_| {
            TrustError::NoPem {
                path: "the node's key".into(),
                what: "private key",
            }
        })?;
        ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(tls_error)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(tls_error)
    }

    /// This peer's certificate and key, PEM.
    pub(crate) fn pem(&self) -> (&str, &str) {
        (&self.inner.cert_pem, &self.inner.key_pem)
    }

    /// The check that a certificate was issued by the mesh CA (chain, validity, usage).
    pub(crate) fn verifier(&self) -> Arc<dyn ClientCertVerifier> {
        self.inner.verifier.clone()
    }

    /// Who this peer is, as its own certificate says.
    pub fn identity(&self) -> &PeerIdentity {
        &self.inner.identity
    }

    /// The server side of a node's gRPC port: client certificates of the mesh CA
    /// required, handshakes bounded by [`HANDSHAKE_TIMEOUT`].
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(
                &self.inner.cert_pem,
                &self.inner.key_pem,
            ))
            .client_ca_root(Certificate::from_pem(&self.inner.ca_pem))
            .timeout(HANDSHAKE_TIMEOUT)
    }

    /// Connects `endpoint` over mutual TLS and returns the channel with the identity
    /// of the node that answered. `endpoint` keeps its own settings (timeouts,
    /// keepalive, windows); its scheme is ignored. With `source`, the connection leaves
    /// from that local address (a node on a multi-homed host, or a simulated node whose
    /// links the simulator tells apart by source address).
    pub async fn connect(
        &self,
        endpoint: &Endpoint,
        source: Option<IpAddr>,
    ) -> Result<(Channel, PeerIdentity), tonic::transport::Error> {
        let answered = Arc::new(Mutex::new(None));
        let channel = endpoint
            .connect_with_connector(self.connector(answered.clone(), source))
            .await?;
        let identity = answered
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
            .expect("a connected TLS channel has verified its server's certificate");
        Ok((channel, identity))
    }

    fn connector(
        &self,
        answered: Arc<Mutex<Option<PeerIdentity>>>,
        source: Option<IpAddr>,
    ) -> impl tower::Service<
        Uri,
        Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
        Error = std::io::Error,
        Future = impl Send,
    > + Send
           + Clone
           + 'static {
        let connector = tokio_rustls::TlsConnector::from(self.inner.client.clone());
        tower::service_fn(move |uri: Uri| {
            let connector = connector.clone();
            let answered = answered.clone();
            async move {
                let invalid = |what: &str| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("{what} in {uri}"),
                    )
                };
                let host = uri.host().ok_or_else(|| invalid("no host"))?;
                let host = host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string();
                let port = uri.port_u16().ok_or_else(|| invalid("no port"))?;
                let tcp = match source {
                    None => TcpStream::connect((host.as_str(), port)).await?,
                    Some(source) => connect_from(source, &host, port).await?,
                };
                tcp.set_nodelay(true)?;
                let name = ServerName::try_from(host).map_err(|_| invalid("a bad host"))?;
                let tls = connector.connect(name, tcp).await?;
                let identity = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .map(|cert| PeerIdentity::from_der(cert, "the server's certificate"))
                    .transpose()
                    .map_err(std::io::Error::other)?;
                *answered
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = identity;
                Ok(TokioIo::new(tls))
            }
        })
    }
}

/// A TCP connection to `host:port` leaving from `source` (any free port).
async fn connect_from(source: IpAddr, host: &str, port: u16) -> std::io::Result<TcpStream> {
    let mut last = None;
    for target in tokio::net::lookup_host((host, port)).await? {
        let socket = match target {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        socket.bind(SocketAddr::new(source, 0))?;
        match socket.connect(target).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{host}:{port} resolves to no address"),
        )
    }))
}

/// Reads the identity of a connected client from the certificates tonic hands a
/// request (`Request::peer_certs`).
pub fn client_identity(certs: &[CertificateDer<'_>]) -> Result<PeerIdentity, TrustError> {
    let first = certs
        .first()
        .ok_or_else(|| TrustError::NotMeshCertificate {
            what: "the client's certificate".into(),
            reason: "the client presented none".into(),
        })?;
    PeerIdentity::from_der(first, "the client's certificate")
}

fn roots(ca_pem: &str, path: &Path) -> Result<RootCertStore, TrustError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(ca_pem, path)? {
        roots.add(cert).map_err(|source| TrustError::Tls {
            what: format!("the CA certificate {}", path.display()),
            source,
        })?;
    }
    Ok(roots)
}

fn certificates(pem: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TrustError> {
    let chain = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| TrustError::NoPem {
            path: path.to_path_buf(),
            what: "certificate",
        })?;
    if chain.is_empty() {
        return Err(TrustError::NoPem {
            path: path.to_path_buf(),
            what: "certificate",
        });
    }
    Ok(chain)
}

/// A server is trusted when its certificate chains to the mesh CA and names a node
/// role; the name dialled is not checked (see the module doc).
#[derive(Debug)]
struct MeshServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // webpki checks the chain, validity and usage before the name, so a name
        // mismatch means everything else already passed.
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Ok(_) => {}
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => {}
            Err(other) => return Err(other),
        }
        let identity = PeerIdentity::from_der(end_entity, "the server's certificate")
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        if !identity.role.is_node() {
            return Err(rustls::Error::General(format!(
                "the server's certificate is {identity}, not a node's"
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
