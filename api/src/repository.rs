//! From a work order's [`Repository`] to what hoard-core opens: the order's object-store
//! credentials as [`StoreOptions`]. The agent (orders it runs) and the controller (its own
//! access to the same storage) both go through here, so both open a repository the same way.

use hoard_core::store::{Credentials, StoreOptions};

use crate::agent::v1::{AzureCredentials, GcsCredentials, Repository, S3Credentials};

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("the repository carries credentials for several providers ({0}); give only those of its location")]
    Several(String),
}

fn given(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

impl S3Credentials {
    /// Whether any field is set (an absent and an all-empty message mean the same).
    pub fn is_set(&self) -> bool {
        [&self.endpoint, &self.region, &self.access_key_id, &self.secret_access_key, &self.session_token]
            .iter()
            .any(|v| !v.is_empty())
    }
}

impl AzureCredentials {
    pub fn is_set(&self) -> bool {
        [&self.account, &self.access_key, &self.sas_token, &self.endpoint].iter().any(|v| !v.is_empty())
    }
}

impl GcsCredentials {
    pub fn is_set(&self) -> bool {
        !self.service_account_json.is_empty()
    }
}

impl From<&S3Credentials> for Credentials {
    fn from(c: &S3Credentials) -> Self {
        Credentials::S3 {
            endpoint: given(&c.endpoint),
            region: given(&c.region),
            access_key_id: given(&c.access_key_id),
            secret_access_key: given(&c.secret_access_key),
            session_token: given(&c.session_token),
        }
    }
}

impl From<&AzureCredentials> for Credentials {
    fn from(c: &AzureCredentials) -> Self {
        Credentials::Azure {
            account: c.account.clone(),
            access_key: given(&c.access_key),
            sas_token: given(&c.sas_token),
            endpoint: given(&c.endpoint),
        }
    }
}

impl From<&GcsCredentials> for Credentials {
    fn from(c: &GcsCredentials) -> Self {
        Credentials::Gcs { service_account_json: c.service_account_json.clone() }
    }
}

/// The repository's explicit credentials, `None` when it carries none. Whether they fit the
/// location is checked when the store is opened ([`hoard_core::store::open_store`]).
pub fn credentials(repo: &Repository) -> Result<Option<Credentials>, CredentialsError> {
    let mut found: Vec<(&str, Credentials)> = Vec::new();
    if let Some(c) = repo.s3.as_ref().filter(|c| c.is_set()) {
        found.push(("s3", c.into()));
    }
    if let Some(c) = repo.azure.as_ref().filter(|c| c.is_set()) {
        found.push(("azure", c.into()));
    }
    if let Some(c) = repo.gcs.as_ref().filter(|c| c.is_set()) {
        found.push(("gcs", c.into()));
    }
    if found.len() > 1 {
        return Err(CredentialsError::Several(found.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")));
    }
    Ok(found.pop().map(|(_, c)| c))
}

/// Options for opening `repo.location` with [`hoard_core::store::open_store`].
pub fn store_options(repo: &Repository) -> Result<StoreOptions, CredentialsError> {
    Ok(StoreOptions { credentials: credentials(repo)?, ..StoreOptions::default() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(location: &str) -> Repository {
        Repository { location: location.into(), password: "pw".into(), ..Default::default() }
    }

    #[test]
    fn s3_fields_map_and_empty_means_unset() {
        let mut r = repo("s3://b/p");
        assert!(credentials(&r).expect("none").is_none());
        r.s3 = Some(S3Credentials::default());
        assert!(credentials(&r).expect("empty").is_none(), "an all-empty message is no credentials");
        r.s3 = Some(S3Credentials {
            endpoint: "http://minio:9000".into(),
            access_key_id: "id".into(),
            secret_access_key: "sk".into(),
            ..Default::default()
        });
        match credentials(&r).expect("s3").as_ref() {
            Some(Credentials::S3 { endpoint, region, access_key_id, secret_access_key, session_token }) => {
                assert_eq!(endpoint.as_deref(), Some("http://minio:9000"));
                assert_eq!((access_key_id.as_deref(), secret_access_key.as_deref()), (Some("id"), Some("sk")));
                assert!(region.is_none() && session_token.is_none());
            }
            other => panic!("{other:?}"),
        }
        // Settings without a key: ambient credentials with this endpoint.
        r.s3 = Some(S3Credentials { region: "eu-west-3".into(), ..Default::default() });
        assert!(matches!(
            credentials(&r).expect("region only").as_ref(),
            Some(Credentials::S3 { access_key_id: None, region: Some(_), .. })
        ));
    }

    #[test]
    fn azure_and_gcs_fields_map() {
        let mut r = repo("az://c/p");
        r.azure = Some(AzureCredentials {
            account: "acct".into(),
            access_key: "a2V5".into(),
            sas_token: String::new(),
            endpoint: "http://127.0.0.1:10000/acct".into(),
        });
        match store_options(&r).expect("azure").credentials.as_ref() {
            Some(Credentials::Azure { account, access_key, sas_token, endpoint }) => {
                assert_eq!((account.as_str(), access_key.as_deref()), ("acct", Some("a2V5")));
                assert_eq!(endpoint.as_deref(), Some("http://127.0.0.1:10000/acct"));
                assert!(sas_token.is_none());
            }
            other => panic!("{other:?}"),
        }
        let mut r = repo("gs://b");
        r.gcs = Some(GcsCredentials { service_account_json: "{}".into() });
        assert!(matches!(
            credentials(&r).expect("gcs").as_ref(),
            Some(Credentials::Gcs { service_account_json }) if service_account_json.as_str() == "{}"
        ));
    }

    #[test]
    fn several_providers_are_refused_without_secrets_in_the_message() {
        let mut r = repo("s3://b");
        r.s3 = Some(S3Credentials {
            access_key_id: "id".into(),
            secret_access_key: "s3-secret".into(),
            ..Default::default()
        });
        r.gcs = Some(GcsCredentials { service_account_json: "gcs-secret".into() });
        let e = store_options(&r).expect_err("two kinds").to_string();
        assert!(e.contains("s3, gcs") && !e.contains("secret"), "{e}");
    }

    /// A kind that does not fit the location is refused when the store is opened.
    #[test]
    fn mismatched_kind_is_refused_by_the_store() {
        let mut r = repo("s3://bucket/p");
        r.azure = Some(AzureCredentials { account: "acct".into(), access_key: "a2V5".into(), ..Default::default() });
        let opts = store_options(&r).expect("one kind");
        let e = hoard_core::store::open_store(&r.location, &opts).expect_err("azure for s3");
        assert!(matches!(e, hoard_core::Error::InvalidArgument(_)), "{e}");
    }
}
