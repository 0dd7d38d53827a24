//! `hoard-agent-cert` (the agent DaemonSet's init container): the certificate it mints for a
//! node is accepted by the controller's client configuration for that node only, and it
//! works with the kinds of CA the chart can give it (rcgen ECDSA, an RSA CA with a PKCS#1
//! key like Helm's `genCA`, an intermediate CA like cert-manager's, and — when
//! `HOARD_CHART_TLS_DIR` is set by hack/chart-check.sh — the Secrets the chart rendered).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use hoard_api::tls::{TlsMaterial, client_config, server_config};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

const BIN: &str = env!("CARGO_BIN_EXE_hoard-agent-cert");

fn ca_params(name: &str) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    CertifiedIssuer::self_signed(ca_params(name), KeyPair::generate().unwrap()).unwrap()
}

/// The controller's client certificate (DNS SAN hoard-controller) signed by `issuer`: (cert, key).
fn controller_cert(issuer: &CertifiedIssuer<'static, KeyPair>) -> (String, String) {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, "hoard-controller");
    p.subject_alt_names = vec![SanType::DnsName("hoard-controller".try_into().unwrap())];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn write(dir: &Path, name: &str, data: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

fn run_cert(node: &str, ca_cert: &Path, ca_key: &Path, out: &Path, trust: Option<&Path>) -> std::process::Output {
    let mut c = Command::new(BIN);
    c.env_remove("NODE_NAME").args(["--node-name", node, "--out-dir"]).arg(out);
    c.arg("--ca-cert").arg(ca_cert).arg("--ca-key").arg(ca_key);
    if let Some(t) = trust {
        c.arg("--trust").arg(t);
    }
    c.output().unwrap()
}

/// Drives a TLS handshake between the agent's server configuration and the controller's client
/// configuration entirely in memory.
fn handshake(server: rustls::ServerConfig, client: rustls::ClientConfig) -> Result<(), rustls::Error> {
    let name = rustls::pki_types::ServerName::try_from("agent.invalid").unwrap();
    let mut c = rustls::ClientConnection::new(Arc::new(client), name)?;
    let mut s = rustls::ServerConnection::new(Arc::new(server))?;
    for _ in 0..20 {
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            s.read_tls(&mut rd).unwrap();
        }
        s.process_new_packets()?;
        let mut buf = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            c.read_tls(&mut rd).unwrap();
        }
        c.process_new_packets()?;
        if !c.is_handshaking() && !s.is_handshaking() && !c.wants_write() {
            return Ok(());
        }
    }
    Err(rustls::Error::General("handshake did not finish".into()))
}

/// The cross-CA arrangement of the chart, from files:
/// * agent side: trusts `controller_ca`, presents `<out>/tls.crt` + key;
/// * controller side: trusts `agent_trust`, presents the controller certificate.
struct Pki {
    agent_trust: Vec<u8>,
    controller_ca: Vec<u8>,
    controller_cert: Vec<u8>,
    controller_key: Vec<u8>,
}

fn check(pki: &Pki, out: &Path, dial: &str) -> Result<(), rustls::Error> {
    let agent = TlsMaterial::from_pem(
        &pki.controller_ca,
        &std::fs::read(out.join("tls.crt")).unwrap(),
        &std::fs::read(out.join("tls.key")).unwrap(),
    )
    .unwrap();
    let controller = TlsMaterial::from_pem(&pki.agent_trust, &pki.controller_cert, &pki.controller_key).unwrap();
    handshake(
        server_config(agent, hoard_api::tls::CONTROLLER_IDENTITY).unwrap(),
        client_config(controller, dial).unwrap(),
    )
}

#[test]
fn minted_certificate_is_accepted_for_its_node_and_refused_for_another() {
    let dir = tempfile::tempdir().unwrap();
    let agent_ca = ca("hoard agent CA");
    let controller_ca = ca("hoard controller CA");
    let (ccert, ckey) = controller_cert(&controller_ca);
    let ca_cert = write(dir.path(), "agent-ca.crt", &agent_ca.pem());
    let ca_key = write(dir.path(), "agent-ca.key", &agent_ca.key().serialize_pem());
    let trust = write(dir.path(), "controller-ca.crt", &controller_ca.pem());
    let out = dir.path().join("out");

    let o = run_cert("node-a", &ca_cert, &ca_key, &out, Some(&trust));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("node:node-a"));

    // The identity is a URI SAN node:<name>, exactly.
    let pem = std::fs::read(out.join("tls.crt")).unwrap();
    let leaf = rustls::pki_types::pem::PemObject::pem_slice_iter(&pem)
        .next()
        .unwrap()
        .map(|c: rustls::pki_types::CertificateDer<'static>| c)
        .unwrap();
    assert_eq!(hoard_api::tls::identities(&leaf), vec!["node:node-a".to_string()]);
    // The key is private to the pod's user; the trust bundle was copied.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(out.join("tls.key")).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::read(out.join("ca.crt")).unwrap(), controller_ca.pem().into_bytes());

    let pki = Pki {
        agent_trust: agent_ca.pem().into_bytes(),
        controller_ca: controller_ca.pem().into_bytes(),
        controller_cert: ccert.clone().into_bytes(),
        controller_key: ckey.clone().into_bytes(),
    };
    check(&pki, &out, "node-a").expect("the controller accepts node-a's agent");
    let err = check(&pki, &out, "node-b").expect_err("node-a's certificate is not node-b's");
    assert!(matches!(err, rustls::Error::InvalidCertificate(_)), "{err:?}");

    // An agent certificate is no controller: the agent CA cannot mint the controller identity
    // the agents accept (they trust only the controller CA).
    let (fake, fake_key) = controller_cert(&agent_ca);
    let forged = Pki { controller_cert: fake.into_bytes(), controller_key: fake_key.into_bytes(), ..pki };
    assert!(check(&forged, &out, "node-a").is_err(), "a controller certificate from the agent CA is refused");

    // Minting again (pod restart) replaces the files.
    let before = std::fs::read(out.join("tls.key")).unwrap();
    let o = run_cert("node-a", &ca_cert, &ca_key, &out, None);
    assert!(o.status.success());
    assert_ne!(std::fs::read(out.join("tls.key")).unwrap(), before);
}

#[test]
fn intermediate_ca_chain_is_presented() {
    // cert-manager style: the agent CA is an intermediate of a root both sides trust.
    let dir = tempfile::tempdir().unwrap();
    let root = ca("root");
    let inter_key = KeyPair::generate().unwrap();
    let inter_cert = ca_params("hoard agent intermediate").signed_by(&inter_key, &root).unwrap();
    let (ccert, ckey) = controller_cert(&root);
    let ca_cert = write(dir.path(), "tls.crt", &inter_cert.pem());
    let ca_key = write(dir.path(), "tls.key", &inter_key.serialize_pem());
    let out = dir.path().join("out");
    let o = run_cert("worker-1", &ca_cert, &ca_key, &out, None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let pki = Pki {
        agent_trust: root.pem().into_bytes(),
        controller_ca: root.pem().into_bytes(),
        controller_cert: ccert.into_bytes(),
        controller_key: ckey.into_bytes(),
    };
    check(&pki, &out, "worker-1").expect("chain through the intermediate");
    assert!(check(&pki, &out, "worker-2").is_err());
}

fn openssl(args: &[&str]) -> bool {
    Command::new("openssl").args(args).output().map(|o| o.status.success()).unwrap_or(false)
}

#[test]
fn rsa_ca_with_pkcs1_key_like_helm_gen_ca() {
    if !openssl(&["version"]) {
        eprintln!("skipped: openssl not found");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).display().to_string();
    assert!(openssl(&["genrsa", "-traditional", "-out", &d("ca.key"), "2048"]));
    assert!(std::fs::read_to_string(d("ca.key")).unwrap().contains("BEGIN RSA PRIVATE KEY"));
    assert!(openssl(&[
        "req",
        "-x509",
        "-new",
        "-key",
        &d("ca.key"),
        "-out",
        &d("ca.crt"),
        "-days",
        "30",
        "-subj",
        "/CN=hoard-agent-ca",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,digitalSignature,keyEncipherment",
    ]));
    let controller_ca = ca("hoard controller CA");
    let (ccert, ckey) = controller_cert(&controller_ca);
    let out = dir.path().join("out");
    let o = run_cert("n1", Path::new(&d("ca.crt")), Path::new(&d("ca.key")), &out, None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let pki = Pki {
        agent_trust: std::fs::read(d("ca.crt")).unwrap(),
        controller_ca: controller_ca.pem().into_bytes(),
        controller_cert: ccert.into_bytes(),
        controller_key: ckey.into_bytes(),
    };
    check(&pki, &out, "n1").expect("RSA CA with a PKCS#1 key");
    assert!(check(&pki, &out, "n2").is_err());
}

#[test]
fn bad_input_fails_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    // Missing flags: EX_USAGE.
    let o = Command::new(BIN).env_remove("NODE_NAME").arg("--out-dir").arg(&out).output().unwrap();
    assert_eq!(o.status.code(), Some(64));
    // A CA file that is not there.
    let o = run_cert("n", &dir.path().join("nope.crt"), &dir.path().join("nope.key"), &out, None);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("nope.crt"));
    // A key where the certificate belongs is refused (never copied into tls.crt).
    let agent_ca = ca("x");
    let key = write(dir.path(), "k.pem", &agent_ca.key().serialize_pem());
    let o = run_cert("n", &key, &key, &out, None);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("private key"));
    // The node name comes from NODE_NAME when the flag is absent (the downward API).
    let crt = write(dir.path(), "c.pem", &agent_ca.pem());
    let o = Command::new(BIN)
        .env("NODE_NAME", "from-env")
        .arg("--ca-cert")
        .arg(&crt)
        .arg("--ca-key")
        .arg(&key)
        .arg("--out-dir")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("node:from-env"));
    assert!(!out.join("ca.crt").exists());
}

/// With `HOARD_CHART_TLS_DIR` (hack/chart-check.sh sets it), the certificates the Helm chart
/// generated (`genCA`/`genSignedCert`, extracted from the rendered Secrets) work end to end.
#[test]
fn chart_rendered_secrets() {
    let Some(dir) = std::env::var_os("HOARD_CHART_TLS_DIR") else {
        eprintln!("skipped: HOARD_CHART_TLS_DIR not set (hack/chart-check.sh sets it)");
        return;
    };
    let dir = PathBuf::from(dir);
    let out = tempfile::tempdir().unwrap();
    // Exactly as the init container runs it.
    let o = run_cert(
        "chart-node",
        &dir.join("agent-ca/tls.crt"),
        &dir.join("agent-ca/tls.key"),
        out.path(),
        Some(&dir.join("agent-ca/ca.crt")),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let read = |p: &str| std::fs::read(dir.join(p)).unwrap();
    let pki = Pki {
        agent_trust: read("controller/ca.crt"),
        controller_ca: std::fs::read(out.path().join("ca.crt")).unwrap(),
        controller_cert: read("controller/tls.crt"),
        controller_key: read("controller/tls.key"),
    };
    check(&pki, out.path(), "chart-node").expect("chart-generated TLS works end to end");
    assert!(check(&pki, out.path(), "other-node").is_err());
}

/// `tls.mode=certManager`: one issuer signs the controller certificate and the agent CA, an
/// intermediate whose key is on every node. Root on one node mints a `hoard-controller`
/// certificate with it and presents it with the intermediate: the agents must refuse it, since
/// they accept only a controller certificate signed directly by the CA they trust.
#[test]
fn a_controller_certificate_minted_with_a_nodes_intermediate_agent_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = ca("issuer root");
    let agent_ca =
        CertifiedIssuer::signed_by(ca_params("hoard agent CA"), KeyPair::generate().unwrap(), &root).unwrap();
    let (ccert, ckey) = controller_cert(&root);
    let out = dir.path().join("out");
    let ca_cert = write(dir.path(), "tls.crt", &agent_ca.pem());
    let ca_key = write(dir.path(), "tls.key", &agent_ca.key().serialize_pem());
    let o = run_cert("worker-1", &ca_cert, &ca_key, &out, None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let pki = Pki {
        agent_trust: root.pem().into_bytes(),
        controller_ca: root.pem().into_bytes(),
        controller_cert: ccert.into_bytes(),
        controller_key: ckey.into_bytes(),
    };
    check(&pki, &out, "worker-1").expect("the real controller is accepted");

    let (forged, forged_key) = controller_cert(&agent_ca);
    let chain = format!("{forged}{}", agent_ca.pem());
    let forged = Pki { controller_cert: chain.into_bytes(), controller_key: forged_key.into_bytes(), ..pki };
    let err = check(&forged, &out, "worker-1").expect_err("a controller certificate from the agent CA is refused");
    assert!(matches!(err, rustls::Error::InvalidCertificate(_)), "{err:?}");
}
