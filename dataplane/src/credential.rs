//! Provider keys. A table names where each endpoint's key lives
//! (`env:NAME`, `file:/path`), never the key; the sidecar resolves the
//! reference in its own environment when it compiles a table, and keeps the
//! key only as a sensitive header value, which neither `Debug` nor any error
//! here ever prints.

use http::HeaderValue;
use switchyard_policy::credential::KeyError;
use switchyard_policy::{ApiKind, CredentialRef};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CredentialError {
    #[error("credential {reference:?}: {reason}")]
    Invalid { reference: String, reason: String },
    #[error("credential {reference}: {error} in the sidecar's environment")]
    Key { reference: String, error: KeyError },
    #[error("credential {0:?} holds characters a header cannot carry")]
    NotAHeader(String),
}

/// The credential header for `reference` in `api`'s form (`Authorization:
/// Bearer`, Azure's `api-key`, Anthropic's `x-api-key`); `None` when the
/// endpoint has no credential (an empty reference).
pub fn resolve(
    api: ApiKind,
    reference: &str,
) -> Result<Option<(&'static str, HeaderValue)>, CredentialError> {
    if reference.is_empty() {
        return Ok(None);
    }
    // A string that does not parse may be a key pasted in the wrong place:
    // the error names its length, not its text.
    let parsed = CredentialRef::parse(reference).map_err(|reason| CredentialError::Invalid {
        reference: format!("<{} characters>", reference.len()),
        reason,
    })?;
    let key = parsed.read_key().map_err(|error| CredentialError::Key {
        reference: reference.to_string(),
        error,
    })?;
    let (name, value) = api.credential_header(&key);
    let mut value = HeaderValue::try_from(value)
        .map_err(|_| CredentialError::NotAHeader(reference.to_string()))?;
    value.set_sensitive(true);
    Ok(Some((name, value)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The header value of an OpenAI endpoint's credential.
    fn bearer(reference: &str) -> Result<Option<HeaderValue>, CredentialError> {
        resolve(ApiKind::Openai, reference).map(|h| h.map(|(_, v)| v))
    }

    #[test]
    fn each_api_gets_the_key_in_its_own_header() {
        let path = secret_file("kinds", "sk-kind\n");
        let r = format!("file:{path}");
        let (name, v) = resolve(ApiKind::Azure, &r).unwrap().unwrap();
        assert_eq!((name, v.to_str().unwrap()), ("api-key", "sk-kind"));
        let (name, v) = resolve(ApiKind::Anthropic, &r).unwrap().unwrap();
        assert_eq!((name, v.to_str().unwrap()), ("x-api-key", "sk-kind"));
        assert!(v.is_sensitive());
        let (name, _) = resolve(ApiKind::Openai, &r).unwrap().unwrap();
        assert_eq!(name, "authorization");
    }

    fn secret_file(name: &str, text: &str) -> String {
        let dir = std::env::temp_dir().join(format!("switchyard-cred-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    }

    #[test]
    fn a_file_reference_becomes_a_sensitive_bearer_header() {
        let path = secret_file("ok", "sk-test-123\n");
        let v = bearer(&format!("file:{path}")).unwrap().unwrap();
        assert_eq!(v.to_str().unwrap(), "Bearer sk-test-123");
        assert!(v.is_sensitive());
        assert!(!format!("{v:?}").contains("sk-test-123"));
        assert_eq!(bearer("").unwrap(), None);
    }

    #[test]
    fn an_environment_reference_reads_the_variable() {
        // PATH is set wherever tests run; setting a variable here would race
        // with other tests.
        let path = std::env::var("PATH").unwrap();
        let v = bearer("env:PATH").unwrap().unwrap();
        assert_eq!(v.to_str().unwrap(), format!("Bearer {}", path.trim()));
    }

    #[test]
    fn what_cannot_be_resolved_is_named_by_reference_only() {
        assert_eq!(
            bearer("env:SWITCHYARD_SURELY_UNSET_VARIABLE").unwrap_err(),
            CredentialError::Key {
                reference: "env:SWITCHYARD_SURELY_UNSET_VARIABLE".into(),
                error: KeyError::EnvMissing("SWITCHYARD_SURELY_UNSET_VARIABLE".into())
            }
        );
        let e = bearer("file:/nonexistent/switchyard/key").unwrap_err();
        assert!(e.to_string().contains("/nonexistent/switchyard/key"), "{e}");
        let empty = secret_file("empty", " \n");
        assert!(matches!(
            bearer(&format!("file:{empty}")),
            Err(CredentialError::Key {
                error: KeyError::Empty,
                ..
            })
        ));
        let broken = secret_file("broken", "sk-a\nsk-b");
        let e = bearer(&format!("file:{broken}")).unwrap_err();
        assert!(!e.to_string().contains("sk-a"), "{e}");
        let e = bearer("sk-live-pasted").unwrap_err();
        assert!(!e.to_string().contains("sk-live-pasted"), "{e}");
    }
}
