//! A peer's identity as its certificate states it: the subject's common name is the
//! peer's name, the organisational unit its [`Role`], and `urn:fogmesh:sensor:ID`
//! subject-alternative-name URIs the sensors it may feed (none: any sensor).
//!
//! Only certificates that already passed chain verification against the mesh CA are
//! read here, so what they say is what the mesh's authority said.

use std::fmt;
use std::str::FromStr;

use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::TrustError;

/// The URI prefix of a sensor id in a certificate's subject alternative names.
pub(crate) const SENSOR_URI_PREFIX: &str = "urn:fogmesh:sensor:";

/// What a certificate allows its holder to do (see [`crate::access`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A node at the cell level, beside the machines.
    Edge,
    /// A node on site.
    Fog,
    /// A node in the cloud.
    Cloud,
    /// A person or tool that changes the mesh: apply, rollout, model uploads.
    Operator,
    /// A producer of samples: ingest only.
    Sensor,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Edge,
        Role::Fog,
        Role::Cloud,
        Role::Operator,
        Role::Sensor,
    ];

    /// Whether this role is one of a mesh node (edge, fog, cloud).
    pub fn is_node(self) -> bool {
        matches!(self, Role::Edge | Role::Fog | Role::Cloud)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Edge => "edge",
            Role::Fog => "fog",
            Role::Cloud => "cloud",
            Role::Operator => "operator",
            Role::Sensor => "sensor",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = TrustError;

    fn from_str(value: &str) -> Result<Role, TrustError> {
        Role::ALL
            .into_iter()
            .find(|role| role.as_str() == value)
            .ok_or_else(|| TrustError::UnknownRole {
                value: value.to_string(),
            })
    }
}

/// Who is on the other end of a connection, read from its verified certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub name: String,
    pub role: Role,
    /// The sensor ids a sensor certificate names; empty means any sensor.
    pub sensors: Vec<String>,
}

impl PeerIdentity {
    /// Reads the identity from a DER certificate. `what` names the certificate in
    /// errors (a file, or "the peer's certificate").
    pub fn from_der(der: &[u8], what: &str) -> Result<PeerIdentity, TrustError> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| TrustError::NotMeshCertificate {
                what: what.to_string(),
                reason: format!("unreadable X.509: {e}"),
            })?;
        PeerIdentity::from_certificate(&cert, what)
    }

    /// [`PeerIdentity::from_der`] of a certificate already parsed.
    pub(crate) fn from_certificate(
        cert: &X509Certificate<'_>,
        what: &str,
    ) -> Result<PeerIdentity, TrustError> {
        let not_mesh = |reason: String| TrustError::NotMeshCertificate {
            what: what.to_string(),
            reason,
        };
        let subject = cert.subject();
        let name = subject
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or_else(|| not_mesh("the subject has no common name".into()))?;
        let role = subject
            .iter_organizational_unit()
            .next()
            .and_then(|ou| ou.as_str().ok())
            .ok_or_else(|| not_mesh("the subject has no organisational unit (role)".into()))?;
        let role = role.parse::<Role>().map_err(|e| not_mesh(e.to_string()))?;
        let mut sensors = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for general in &san.value.general_names {
                if let GeneralName::URI(uri) = general {
                    if let Some(id) = uri.strip_prefix(SENSOR_URI_PREFIX) {
                        sensors.push(id.to_string());
                    }
                }
            }
        }
        Ok(PeerIdentity {
            name: name.to_string(),
            role,
            sensors,
        })
    }

    /// Whether this peer may push samples of `sensor`: a sensor certificate that
    /// names sensors may feed only those; every other allowed caller any sensor.
    pub fn may_feed(&self, sensor: &str) -> bool {
        self.role != Role::Sensor
            || self.sensors.is_empty()
            || self.sensors.iter().any(|s| s == sensor)
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.role)
    }
}

/// Checks a peer or sensor name for a certificate: 1 to 64 characters of ASCII
/// letters, digits, `.`, `_`, `-`, `/` and `:`, starting with a letter or digit.
pub(crate) fn check_name(name: &str) -> Result<(), TrustError> {
    let bad = |reason| TrustError::BadName {
        name: name.to_string(),
        reason,
    };
    if name.is_empty() || name.len() > 64 {
        return Err(bad("it must be 1 to 64 characters long"));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(bad("it must start with a letter or digit"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/' | ':'))
    {
        return Err(bad("only ASCII letters, digits and . _ - / : are allowed"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip_through_their_names() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>().unwrap(), role);
        }
        let error = "admin".parse::<Role>().unwrap_err().to_string();
        assert!(error.contains("\"admin\""), "{error}");
    }

    #[test]
    fn a_sensor_certificate_that_names_sensors_feeds_only_those() {
        let named = PeerIdentity {
            name: "press-line".into(),
            role: Role::Sensor,
            sensors: vec!["press-1".into()],
        };
        assert!(named.may_feed("press-1"));
        assert!(!named.may_feed("press-2"));
        let any = PeerIdentity {
            sensors: vec![],
            ..named.clone()
        };
        assert!(any.may_feed("press-2"));
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("edge-1").is_ok());
        assert!(check_name("site-1/area-2:cell_3.x").is_ok());
        for bad in ["", "-edge", "edge 1", "é", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
