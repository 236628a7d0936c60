//! A shared secret (the mesh's `[cluster] secret`): never printed, compared in
//! constant time, read from a file or the environment and never from a command line.

use std::fmt;

use serde::Deserialize;
use subtle::ConstantTimeEq;

/// A secret string. `Debug` and `Display` print `<redacted>`.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that must use it (a key derivation, the
    /// cluster handshake); never for logs.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(secret: String) -> Secret {
        Secret(secret)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Secret) -> bool {
        self.0.as_bytes().ct_eq(other.0.as_bytes()).into()
    }
}

impl Eq for Secret {}

/// Whether two byte strings are equal, in time that does not depend on where they
/// differ (for keys and digests a caller presents).
pub fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_never_prints() {
        let secret = Secret("plant-7-secret".into());
        assert_eq!(format!("{secret:?}"), "<redacted>");
        assert_eq!(secret, Secret("plant-7-secret".into()));
        assert_ne!(secret, Secret("plant-8-secret".into()));
        assert!(
            same_bytes(b"abc", b"abc") && !same_bytes(b"abc", b"abd") && !same_bytes(b"abc", b"ab")
        );
    }
}
