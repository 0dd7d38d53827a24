//! hoard-api: contracts shared by the controller and the node agent.
//!
//! [`agent::v1`] is the work-order protocol (`proto/hoard/agent/v1/agent.proto`), compiled at
//! build time. Messages that carry secrets ([`agent::v1::Repository`],
//! [`agent::v1::S3Credentials`], [`agent::v1::AzureCredentials`], [`agent::v1::GcsCredentials`])
//! print redacted: `Debug` of any order never shows a password or a secret key.
//! [`repository`] turns an order's repository into hoard-core's store options.
//!
//! [`crd`] holds the custom resources the controller, the kubectl plugin and the chart share.
//!
//! [`tls`] builds the mutual-TLS configurations for both sides and [`client`] dials an agent.

pub mod client;
pub mod crd;
pub mod repository;
pub mod tls;

pub mod agent {
    pub mod v1 {
        #![allow(missing_debug_implementations, clippy::all)]
        tonic::include_proto!("hoard.agent.v1");

        use std::fmt;

        fn redacted(s: &str) -> &'static str {
            if s.is_empty() { "" } else { "<redacted>" }
        }

        impl fmt::Debug for Repository {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct("Repository")
                    .field("location", &self.location)
                    .field("password", &redacted(&self.password))
                    .field("s3", &self.s3)
                    .field("azure", &self.azure)
                    .field("gcs", &self.gcs)
                    .finish()
            }
        }

        impl fmt::Debug for AzureCredentials {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct("AzureCredentials")
                    .field("account", &self.account)
                    .field("access_key", &redacted(&self.access_key))
                    .field("sas_token", &redacted(&self.sas_token))
                    .field("endpoint", &self.endpoint)
                    .finish()
            }
        }

        impl fmt::Debug for GcsCredentials {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct("GcsCredentials")
                    .field("service_account_json", &redacted(&self.service_account_json))
                    .finish()
            }
        }

        impl fmt::Debug for S3Credentials {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct("S3Credentials")
                    .field("endpoint", &self.endpoint)
                    .field("region", &self.region)
                    .field("access_key_id", &self.access_key_id)
                    .field("secret_access_key", &redacted(&self.secret_access_key))
                    .field("session_token", &redacted(&self.session_token))
                    .finish()
            }
        }

        impl Phase {
            /// Whether no further event follows one in this phase.
            pub fn is_terminal(self) -> bool {
                matches!(self, Phase::Done | Phase::Failed | Phase::Cancelled)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::agent::v1::*;

    #[test]
    fn debug_of_an_order_redacts_secrets() {
        let order = BackupOrder {
            order_id: "o-1".into(),
            repository: Some(Repository {
                location: "s3://bucket/prefix".into(),
                password: "hunter2-password".into(),
                s3: Some(S3Credentials {
                    endpoint: "http://127.0.0.1:9000".into(),
                    region: "us-east-1".into(),
                    access_key_id: "AKIDEXAMPLE".into(),
                    secret_access_key: "very-secret-key".into(),
                    session_token: "session-token-value".into(),
                }),
                azure: Some(AzureCredentials {
                    account: "devstoreaccount1".into(),
                    access_key: "azure-access-key".into(),
                    sas_token: "sv=1&sig=azure-sas".into(),
                    endpoint: String::new(),
                }),
                gcs: Some(GcsCredentials { service_account_json: r#"{"private_key": "gcs-key"}"#.into() }),
            }),
            ..Default::default()
        };
        let shown = format!("{order:?} {order:#?}");
        for secret in
            ["hunter2-password", "very-secret-key", "session-token-value", "azure-access-key", "azure-sas", "gcs-key"]
        {
            assert!(!shown.contains(secret), "{secret} leaked in {shown}");
        }
        assert!(shown.contains("s3://bucket/prefix") && shown.contains("<redacted>"));
    }

    #[test]
    fn terminal_phases() {
        assert!(Phase::Done.is_terminal() && Phase::Failed.is_terminal() && Phase::Cancelled.is_terminal());
        assert!(!Phase::Running.is_terminal() && !Phase::Queued.is_terminal());
    }
}
