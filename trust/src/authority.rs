//! The mesh's certificate authority: `fogmesh ca init` makes one, `fogmesh ca issue`
//! signs a certificate for a node, an operator or a sensor with it.
//!
//! A CA folder holds `ca.pem` (the certificate every node trusts) and `ca.key` (kept
//! by whoever issues certificates; never needed by a node). Keys are written with mode
//! 0600 and no file is ever overwritten, so re-running a command cannot silently
//! replace an identity that a node already uses. Keys are ECDSA P-256.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::identity::{check_name, SENSOR_URI_PREFIX};
use crate::{Role, TlsFiles, TrustError};

/// File names inside a CA folder.
const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca.key";
/// How long a CA certificate is valid.
const CA_DAYS: i64 = 3650;
/// Certificates start being valid this long before they are made, so a node whose
/// clock runs a little behind the issuer's still accepts them.
const BACKDATE: Duration = Duration::hours(1);

/// A mesh CA loaded from its folder, able to issue certificates.
pub struct MeshCa {
    cert_path: PathBuf,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for MeshCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The signing key is never printed.
        f.debug_struct("MeshCa")
            .field("cert_path", &self.cert_path)
            .finish_non_exhaustive()
    }
}

/// What to put in a certificate.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    /// The peer's name: a node's `[node] name`, an operator's or a sensor gateway's.
    pub name: String,
    pub role: Role,
    /// For a sensor certificate: the only sensor ids it may feed (empty: any).
    pub sensors: Vec<String>,
    /// Days of validity from now.
    pub days: u32,
}

impl MeshCa {
    /// Creates a new CA in `dir` (made if missing). `mesh` names the mesh in the
    /// CA's subject. Refuses if `dir` already holds a CA.
    pub fn init(dir: &Path, mesh: &str) -> Result<MeshCa, TrustError> {
        check_name(mesh)?;
        fs::create_dir_all(dir).map_err(|source| TrustError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let key = KeyPair::generate().map_err(|source| TrustError::Generate {
            what: "the CA key".into(),
            source,
        })?;
        let mut params = CertificateParams::default();
        let mut subject = DistinguishedName::new();
        subject.push(DnType::CommonName, format!("fogmesh CA {mesh}"));
        subject.push(DnType::OrganizationName, "fogmesh");
        params.distinguished_name = subject;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + Duration::days(CA_DAYS);
        let cert = params
            .self_signed(&key)
            .map_err(|source| TrustError::Generate {
                what: "the CA certificate".into(),
                source,
            })?;
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        for path in [&cert_path, &key_path] {
            if path.exists() {
                return Err(TrustError::Exists { path: path.clone() });
            }
        }
        write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
        Ok(MeshCa {
            cert_path,
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads the CA in `dir` (its `ca.pem` and `ca.key`).
    pub fn load(dir: &Path) -> Result<MeshCa, TrustError> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        let cert_pem = read(&cert_path)?;
        let key_pem = read(&key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|_| TrustError::NoPem {
            path: key_path.clone(),
            what: "private key",
        })?;
        let issuer =
            Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|source| TrustError::Generate {
                what: format!("the CA from {}", cert_path.display()),
                source,
            })?;
        Ok(MeshCa {
            cert_path,
            cert_pem,
            issuer,
        })
    }

    /// The CA certificate's file.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a certificate and key in memory: `(cert_pem, key_pem)`.
    pub fn issue_pem(&self, request: &IssueRequest) -> Result<(String, String), TrustError> {
        check_name(&request.name)?;
        for sensor in &request.sensors {
            check_name(sensor)?;
        }
        // Ed25519, so the same identity that speaks TLS can sign model versions
        // (`crate::signing`) without a second key to distribute.
        let key =
            KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(|source| TrustError::Generate {
                what: format!("the key of {}", request.name),
                source,
            })?;
        let mut params = CertificateParams::default();
        let mut subject = DistinguishedName::new();
        subject.push(DnType::CommonName, request.name.as_str());
        subject.push(DnType::OrganizationalUnitName, request.role.as_str());
        subject.push(DnType::OrganizationName, "fogmesh");
        params.distinguished_name = subject;
        let mut names = Vec::new();
        if request
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        {
            names.push(SanType::DnsName(ia5(&request.name)?));
        }
        for sensor in &request.sensors {
            names.push(SanType::URI(ia5(&format!("{SENSOR_URI_PREFIX}{sensor}"))?));
        }
        params.subject_alt_names = names;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Only nodes serve; an operator's or a sensor's certificate cannot be used
        // to impersonate a node's server.
        params.extended_key_usages = if request.role.is_node() {
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ]
        } else {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        };
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + Duration::days(i64::from(request.days.max(1)));
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| TrustError::Generate {
                what: format!("the certificate of {}", request.name),
                source,
            })?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Issues a certificate into `out` as `NAME.pem` and `NAME.key` (0600), with the
    /// CA certificate beside them as `ca.pem` (kept if already there), and returns the
    /// three files the holder loads. Refuses to overwrite the certificate or the key.
    pub fn issue(&self, request: &IssueRequest, out: &Path) -> Result<TlsFiles, TrustError> {
        let (cert_pem, key_pem) = self.issue_pem(request)?;
        fs::create_dir_all(out).map_err(|source| TrustError::Io {
            path: out.to_path_buf(),
            source,
        })?;
        let files = MeshCa::issued_files(out, &request.name);
        for path in [&files.cert, &files.key] {
            if path.exists() {
                return Err(TrustError::Exists { path: path.clone() });
            }
        }
        write_new(&files.key, key_pem.as_bytes(), 0o600)?;
        write_new(&files.cert, cert_pem.as_bytes(), 0o644)?;
        if !files.ca.exists() {
            write_new(&files.ca, self.cert_pem.as_bytes(), 0o644)?;
        }
        Ok(files)
    }

    /// Where [`MeshCa::issue`] puts the files of `name` in `out`.
    pub fn issued_files(out: &Path, name: &str) -> TlsFiles {
        let file = name.replace(['/', ':'], "_");
        TlsFiles {
            ca: out.join(CA_CERT),
            cert: out.join(format!("{file}.pem")),
            key: out.join(format!("{file}.key")),
        }
    }
}

fn ia5(text: &str) -> Result<Ia5String, TrustError> {
    Ia5String::try_from(text).map_err(|source| TrustError::Generate {
        what: format!("the name {text:?}"),
        source,
    })
}

pub(crate) fn read(path: &Path) -> Result<String, TrustError> {
    fs::read_to_string(path).map_err(|source| TrustError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes a file that must not exist yet, with `mode` from the start (a key is
/// never readable by others, not even for an instant).
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TrustError> {
    let io = |source| TrustError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::PeerIdentity;

    fn request(name: &str, role: Role, sensors: &[&str]) -> IssueRequest {
        IssueRequest {
            name: name.into(),
            role,
            sensors: sensors.iter().map(|s| s.to_string()).collect(),
            days: 30,
        }
    }

    #[test]
    fn an_issued_certificate_names_its_holder_role_and_sensors() {
        let dir = tempfile::tempdir().unwrap();
        let ca = MeshCa::init(&dir.path().join("ca"), "plant-1").unwrap();
        let files = ca
            .issue(
                &request("line-3", Role::Sensor, &["press-1", "press-2"]),
                &dir.path().join("certs"),
            )
            .unwrap();
        let pem = std::fs::read_to_string(&files.cert).unwrap();
        let der = rustls::pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
            .map(|c: rustls::pki_types::CertificateDer<'static>| c)
            .unwrap();
        let identity = PeerIdentity::from_der(&der, "test").unwrap();
        assert_eq!(identity.name, "line-3");
        assert_eq!(identity.role, Role::Sensor);
        assert_eq!(identity.sensors, ["press-1", "press-2"]);
        let mode = std::fs::metadata(&files.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "key mode {mode:o}");
        let ca_key = dir.path().join("ca").join(CA_KEY);
        let mode = std::fs::metadata(ca_key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "CA key mode {mode:o}");
    }

    #[test]
    fn nothing_is_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        MeshCa::init(&ca_dir, "plant-1").unwrap();
        let again = MeshCa::init(&ca_dir, "plant-1").unwrap_err();
        assert!(matches!(again, TrustError::Exists { .. }), "{again}");
        let ca = MeshCa::load(&ca_dir).unwrap();
        let out = dir.path().join("certs");
        ca.issue(&request("edge-1", Role::Edge, &[]), &out).unwrap();
        let again = ca
            .issue(&request("edge-1", Role::Edge, &[]), &out)
            .unwrap_err();
        assert!(matches!(again, TrustError::Exists { .. }), "{again}");
    }

    #[test]
    fn bad_names_are_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let ca = MeshCa::init(&dir.path().join("ca"), "plant-1").unwrap();
        let out = dir.path().join("certs");
        let error = ca
            .issue(&request("edge 1", Role::Edge, &[]), &out)
            .unwrap_err();
        assert!(error.to_string().contains("\"edge 1\""), "{error}");
        assert!(!out.exists());
    }
}
