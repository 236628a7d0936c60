//! An ephemeral mesh CA for tests: every fixture node serves mutual TLS, as a node
//! in a plant does, with certificates issued into the test's own temporary folder.
//! Clients get certificates by role (an operator changes the mesh, a sensor ingests).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fogmesh_cluster::dialer::Dialer;
use fogmesh_cluster::model_seal::{MeshSeal, DEFAULT_MODEL_SIGNERS};
use fogmesh_cluster::TlsSection;
use fogmesh_models::store::ModelStore;
use fogmesh_trust::{IssueRequest, MeshCa, MeshTls, Role, TlsFiles};

/// A mesh CA in a folder, issuing certificates next to it.
pub struct TestPki {
    dir: PathBuf,
    ca: MeshCa,
}

impl TestPki {
    /// The CA in `dir/ca`, made on first use; certificates go to
    /// `dir/<name>-<role>-<sensors>/`.
    pub fn open(dir: &Path) -> TestPki {
        let ca_dir = dir.join("ca");
        let ca = if ca_dir.join("ca.pem").exists() {
            MeshCa::load(&ca_dir).expect("the test CA loads")
        } else {
            MeshCa::init(&ca_dir, "test-mesh").expect("a test CA")
        };
        TestPki {
            dir: dir.to_path_buf(),
            ca,
        }
    }

    pub fn ca_path(&self) -> PathBuf {
        self.ca.cert_path().to_path_buf()
    }

    /// Issues `name` in `role` (sensor ids only for sensors) and returns its files;
    /// asking again for the same name, role and sensors returns the same files.
    pub fn issue(&self, name: &str, role: Role, sensors: &[&str]) -> TlsFiles {
        let out = self.dir.join(format!(
            "{}-{role}-{}",
            name.replace(['/', ':'], "_"),
            sensors.join("+")
        ));
        let files = MeshCa::issued_files(&out, name);
        if !files.cert.exists() {
            let request = IssueRequest {
                name: name.to_string(),
                role,
                sensors: sensors.iter().map(|s| s.to_string()).collect(),
                days: 2,
            };
            self.ca.issue(&request, &out).expect("the test CA issues");
        }
        files
    }

    /// The `[tls]` section of a node called `name` in `role`.
    pub fn node_tls(&self, name: &str, role: Role) -> TlsSection {
        let files = self.issue(name, role, &[]);
        TlsSection {
            ca: Some(files.ca),
            cert: Some(files.cert),
            key: Some(files.key),
            insecure: false,
            model_signers: None,
        }
    }

    /// The same as TOML, to append to a `node.toml`.
    pub fn node_tls_toml(&self, name: &str, role: Role) -> String {
        let files = self.issue(name, role, &[]);
        format!(
            "\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
            files.ca, files.cert, files.key
        )
    }

    /// A client identity.
    pub fn tls(&self, name: &str, role: Role, sensors: &[&str]) -> MeshTls {
        MeshTls::load(&self.issue(name, role, sensors)).expect("the test certificate loads")
    }

    /// A dialer holding a certificate of `name` in `role`.
    pub fn dialer(&self, name: &str, role: Role) -> Dialer {
        Dialer::new(Some(self.tls(name, role, &[])), None)
    }

    /// An operator's dialer.
    pub fn operator(&self) -> Dialer {
        self.dialer("operator", Role::Operator)
    }

    /// `FOGMESH_CA`, `FOGMESH_CERT` and `FOGMESH_KEY` of an operator, for the CLI.
    pub fn operator_env(&self) -> [(&'static str, PathBuf); 3] {
        let files = self.issue("operator", Role::Operator, &[]);
        [
            ("FOGMESH_CA", files.ca),
            ("FOGMESH_CERT", files.cert),
            ("FOGMESH_KEY", files.key),
        ]
    }

    /// A model store at `root` as an operator's machine keeps it: what is imported
    /// into it is signed by the test operator, and signatures are checked as a node
    /// of this mesh checks them, so its versions serve on the fixture nodes.
    pub fn signing_store(&self, root: &Path) -> ModelStore {
        ModelStore::open(root).sealed(Arc::new(self.operator_seal()))
    }

    /// The test operator's seal, which signs models and files.
    pub fn operator_seal(&self) -> MeshSeal {
        let operator = self.tls("operator", Role::Operator, &[]);
        MeshSeal::new(&operator, &DEFAULT_MODEL_SIGNERS).expect("the test operator signs models")
    }

    /// A sensor gateway's dialer, allowed to feed any sensor.
    pub fn sensor(&self) -> Dialer {
        self.dialer("sensor-gateway", Role::Sensor)
    }
}

/// A plant's own CA and the certificate it gave its MQTT broker at 127.0.0.1: the
/// broker is not a member of the mesh, so its certificate does not come from the mesh
/// CA, and nodes name this CA in `[[mqtt]] ca`.
pub struct BrokerCertificate {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl BrokerCertificate {
    /// Makes the plant CA and the broker's certificate and key in `dir`.
    pub fn issue(dir: &Path) -> BrokerCertificate {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        std::fs::create_dir_all(dir).expect("the folder for the broker's certificate");
        let ca_key = KeyPair::generate().expect("a plant CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "plant broker CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("the plant CA");
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().expect("a broker key");
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("broker params");
        params
            .distinguished_name
            .push(DnType::CommonName, "plant broker");
        let cert = params
            .signed_by(&key, &issuer)
            .expect("the broker's certificate");
        let files = BrokerCertificate {
            ca: dir.join("plant-ca.pem"),
            cert: dir.join("broker.pem"),
            key: dir.join("broker.key"),
        };
        std::fs::write(&files.ca, ca_cert.pem()).expect("the plant CA is written");
        std::fs::write(&files.cert, cert.pem()).expect("the broker certificate is written");
        std::fs::write(&files.key, key.serialize_pem()).expect("the broker key is written");
        files
    }
}
