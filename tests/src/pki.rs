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
        let operator = self.tls("operator", Role::Operator, &[]);
        let seal = MeshSeal::new(&operator, &DEFAULT_MODEL_SIGNERS)
            .expect("the test operator signs models");
        ModelStore::open(root).sealed(Arc::new(seal))
    }

    /// A sensor gateway's dialer, allowed to feed any sensor.
    pub fn sensor(&self) -> Dialer {
        self.dialer("sensor-gateway", Role::Sensor)
    }
}
