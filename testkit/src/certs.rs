//! Test certificates for the agent's mutual TLS, generated with rcgen into a directory.
//!
//! | files | signed by | identity (SAN) | use |
//! | --- | --- | --- | --- |
//! | `ca.pem` | self | — | the CA both sides trust |
//! | `agent.pem`, `agent-key.pem` | CA | URI `node:<node>` | the agent's server certificate |
//! | `controller.pem`, `controller-key.pem` | CA | DNS `hoard-controller` | the legitimate client |
//! | `intruder.pem`, `intruder-key.pem` | CA | DNS `not-the-controller` | right CA, wrong identity |
//! | `other-node.pem`, `other-node-key.pem` | CA | URI `node:<node>-other` | an agent of another node |
//! | `other-ca.pem` | self | — | an unrelated CA |
//! | `rogue.pem`, `rogue-key.pem` | other CA | DNS `hoard-controller` | right identity, wrong CA |
//! | `rogue-agent.pem`, `rogue-agent-key.pem` | other CA | URI `node:<node>` | an impostor agent |

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

/// Where [`make_test_pki`] wrote its files.
#[derive(Debug, Clone)]
pub struct TestPki {
    pub dir: PathBuf,
    pub node: String,
}

impl TestPki {
    /// `<dir>/<name>.pem`.
    pub fn pem(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pem"))
    }
    /// `<dir>/<name>-key.pem`.
    pub fn key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-key.pem"))
    }
    /// Reads `<name>.pem`.
    pub fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.pem(name)).unwrap()
    }
    /// Reads `<name>-key.pem`.
    pub fn read_key(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.key(name)).unwrap()
    }
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
}

fn leaf(dir: &Path, file: &str, issuer: &CertifiedIssuer<'static, KeyPair>, san: SanType, server: bool) {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, file);
    p.subject_alt_names = vec![san];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages =
        vec![if server { ExtendedKeyUsagePurpose::ServerAuth } else { ExtendedKeyUsagePurpose::ClientAuth }];
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, issuer).unwrap();
    std::fs::write(dir.join(format!("{file}.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{file}-key.pem")), key.serialize_pem()).unwrap();
}

fn dns(s: &str) -> SanType {
    SanType::DnsName(s.try_into().unwrap())
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

/// Generates the certificates in the table above for the agent of `node` into `dir`.
pub fn make_test_pki(dir: &Path, node: &str) -> TestPki {
    std::fs::create_dir_all(dir).unwrap();
    let ca1 = ca("hoard test CA");
    let ca2 = ca("unrelated CA");
    std::fs::write(dir.join("ca.pem"), ca1.pem()).unwrap();
    std::fs::write(dir.join("other-ca.pem"), ca2.pem()).unwrap();
    leaf(dir, "agent", &ca1, uri(&format!("node:{node}")), true);
    leaf(dir, "controller", &ca1, dns("hoard-controller"), false);
    leaf(dir, "intruder", &ca1, dns("not-the-controller"), false);
    leaf(dir, "other-node", &ca1, uri(&format!("node:{node}-other")), true);
    leaf(dir, "rogue", &ca2, dns("hoard-controller"), false);
    leaf(dir, "rogue-agent", &ca2, uri(&format!("node:{node}")), true);
    TestPki { dir: dir.to_path_buf(), node: node.to_string() }
}

/// Certificates for a simulated cluster: one CA, the controller's client certificate
/// (`controller.pem`, DNS `hoard-controller`) and one agent certificate per node
/// (`agent-<node>.pem`, URI `node:<node>`), all in `dir`.
pub fn make_cluster_pki(dir: &Path, nodes: &[&str]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let ca1 = ca("hoard cluster test CA");
    std::fs::write(dir.join("ca.pem"), ca1.pem()).unwrap();
    leaf(dir, "controller", &ca1, dns("hoard-controller"), false);
    for node in nodes {
        leaf(dir, &format!("agent-{node}"), &ca1, uri(&format!("node:{node}")), true);
    }
    dir.to_path_buf()
}
