//! Dialling an agent: TCP, then TLS with [`crate::tls::client_config`], then HTTP/2 gRPC.
//!
//! tonic's own TLS is not used: the agent is verified by its node identity rather than by the
//! dialled host name, which needs the custom verifier in [`crate::tls`].

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::agent::v1::agent_client::AgentClient;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("bad agent address {0:?}")]
    Address(String),
    #[error("connect to agent: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Connects to the agent at `addr` (`host:port`) and checks during the handshake that it is the
/// agent of the node `tls` was built for. Fails if the handshake does not complete in
/// `timeout`.
pub async fn connect(
    addr: &str,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<AgentClient<Channel>, ConnectError> {
    // The scheme only tells tonic to speak plain HTTP/2 over what the connector returns.
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|_| ConnectError::Address(addr.to_string()))?
        .connect_timeout(timeout)
        .timeout(Duration::from_secs(24 * 3600))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    let connector = tower::service_fn(move |uri: Uri| {
        let tls = Arc::clone(&tls);
        async move {
            let host = uri.host().unwrap_or("localhost").trim_matches(|c| c == '[' || c == ']').to_string();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = tokio::time::timeout(timeout, tokio::net::TcpStream::connect((host.as_str(), port)))
                .await
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
            tcp.set_nodelay(true)?;
            // The verifier ignores the name; SNI just needs to be well formed.
            let name = rustls::pki_types::ServerName::try_from("hoard-agent")
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let stream = tokio::time::timeout(timeout, tokio_rustls::TlsConnector::from(tls).connect(name, tcp))
                .await
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    let channel = endpoint.connect_with_connector(connector).await?;
    Ok(AgentClient::new(channel))
}
