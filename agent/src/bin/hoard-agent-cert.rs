//! `hoard-agent-cert`: mints this node's agent certificate at pod start (the agent DaemonSet's
//! init container runs it). Helm cannot know node names, so the chart ships a CA (the "agent
//! CA") that only this init container mounts; it signs a fresh key pair whose certificate
//! carries the URI SAN `node:<node-name>` (see `hoard_api::tls::node_identity`), the identity
//! the controller requires of the agent on that node.
//!
//! Writes into `--out-dir` (an in-memory emptyDir shared with the agent container):
//! * `tls.crt`: the node certificate followed by the contents of `--ca-cert` (the CA and its
//!   chain), so an intermediate CA (cert-manager) is presented to the controller;
//! * `tls.key`: its private key (mode 0600);
//! * `ca.crt`: a copy of `--trust` when given: the CA the agent trusts for the controller's
//!   client certificate, so the agent container needs no other Secret.
//!
//! Exit codes: 0 written, 64 bad flags, 1 anything else (message on stderr).

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Parser;
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose, SanType};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use x509_parser::time::ASN1Time;

/// Mints the agent certificate of this node (URI SAN node:<node-name>) signed by the agent CA.
#[derive(Debug, Parser)]
#[command(name = "hoard-agent-cert", version)]
struct Args {
    /// This node's name (spec.nodeName, from the downward API).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// The agent CA certificate (PEM; the first certificate is the signer, any further ones
    /// are its chain and are appended to tls.crt).
    #[arg(long)]
    ca_cert: PathBuf,
    /// The agent CA private key (PEM: PKCS#8, PKCS#1 RSA or SEC1 EC).
    #[arg(long)]
    ca_key: PathBuf,
    /// Directory to write tls.crt, tls.key (and ca.crt with --trust) into.
    #[arg(long)]
    out_dir: PathBuf,
    /// CA bundle (PEM) the agent trusts for client certificates, copied to <out-dir>/ca.crt.
    #[arg(long)]
    trust: Option<PathBuf>,
    /// Validity of the certificate in days (capped at the CA's own expiry). The certificate is
    /// minted again on every pod start.
    #[arg(long, default_value_t = 3650)]
    validity_days: u32,
}

fn read(p: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
}

/// Writes `data` to `dir/name` through a temporary file and a rename, with `mode`.
fn write_atomic(dir: &Path, name: &str, data: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| anyhow::anyhow!("{}: {e}", tmp.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    let dst = dir.join(name);
    std::fs::rename(&tmp, &dst).map_err(|e| anyhow::anyhow!("{}: {e}", dst.display()))?;
    Ok(())
}

/// The certificates in a PEM text, as DER, in order.
fn certificates(pem_text: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    Ok(CertificateDer::pem_slice_iter(pem_text.as_bytes()).collect::<Result<Vec<_>, _>>()?)
}

/// Seconds since the Unix epoch, now.
fn unix_now() -> anyhow::Result<i64> {
    Ok(i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs())?)
}

fn mint(args: &Args) -> anyhow::Result<String> {
    if args.node_name.is_empty() {
        anyhow::bail!("--node-name is empty (is NODE_NAME set from spec.nodeName?)");
    }
    let ca_pem = read(&args.ca_cert)?;
    if ca_pem.contains("PRIVATE KEY") {
        anyhow::bail!("{}: holds a private key; pass the certificate only", args.ca_cert.display());
    }
    let ca_chain = certificates(&ca_pem).map_err(|e| anyhow::anyhow!("{}: {e}", args.ca_cert.display()))?;
    let Some(ca_first) = ca_chain.first() else {
        anyhow::bail!("{}: holds no certificate", args.ca_cert.display());
    };
    let ca_key = KeyPair::from_pem(&read(&args.ca_key)?)
        .map_err(|e| anyhow::anyhow!("{}: not a usable private key: {e}", args.ca_key.display()))?;
    let issuer = Issuer::from_ca_cert_der(ca_first, ca_key)
        .map_err(|e| anyhow::anyhow!("{}: not a usable CA certificate: {e}", args.ca_cert.display()))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(ca_first.as_ref())
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.ca_cert.display()))?;
    let ca_not_after = parsed.validity().not_after.timestamp();

    let identity = hoard_api::tls::node_identity(&args.node_name);
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, format!("hoard-agent {}", args.node_name));
    p.subject_alt_names = vec![SanType::URI(identity.as_str().try_into()?)];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // The agent is the TLS server; ClientAuth too, harmless, for tools that check either.
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let now = unix_now()?;
    let not_after = (now + i64::from(args.validity_days) * 86_400).min(ca_not_after);
    if not_after <= now {
        anyhow::bail!("{}: the CA certificate has expired", args.ca_cert.display());
    }
    let at = |secs: i64| ASN1Time::from_timestamp(secs).map(|t| t.to_datetime());
    // A little slack for clocks that disagree between nodes.
    p.not_before = at(now - 300)?;
    p.not_after = at(not_after)?;
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer)?;

    std::fs::create_dir_all(&args.out_dir).map_err(|e| anyhow::anyhow!("{}: {e}", args.out_dir.display()))?;
    let mut chain = cert.pem();
    chain.push_str(ca_pem.trim_start());
    if !chain.ends_with('\n') {
        chain.push('\n');
    }
    write_atomic(&args.out_dir, "tls.key", key.serialize_pem().as_bytes(), 0o600)?;
    write_atomic(&args.out_dir, "tls.crt", chain.as_bytes(), 0o644)?;
    if let Some(trust) = &args.trust {
        let bundle = read(trust)?;
        if certificates(&bundle).map_err(|e| anyhow::anyhow!("{}: {e}", trust.display()))?.is_empty() {
            anyhow::bail!("{}: holds no certificate", trust.display());
        }
        write_atomic(&args.out_dir, "ca.crt", bundle.as_bytes(), 0o644)?;
    }
    Ok(identity)
}

fn main() -> std::process::ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return std::process::ExitCode::from(if e.use_stderr() { 64 } else { 0 });
        }
    };
    match mint(&args) {
        Ok(identity) => {
            println!("hoard-agent-cert: wrote {} for {identity}", args.out_dir.join("tls.crt").display());
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hoard-agent-cert: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
