//! The syntax of an endpoint's `credential`: a reference to where a
//! provider key lives, in the sidecar's environment, never the key.
//!
//! One definition for both sides: the control plane checks references with
//! it when it loads the policy, the sidecar resolves them with it
//! (`switchyard_dataplane::credential`). Errors never repeat the text they
//! refuse: a key pasted where the reference belongs (`env:sk-...`) must not
//! reach a log.

/// Where an endpoint's provider key is found, in the sidecar's environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialRef<'a> {
    /// `env:NAME`: the environment variable `NAME`.
    Env(&'a str),
    /// `file:PATH`: the whole file at `PATH`, without trailing whitespace
    /// (a mounted secret).
    File(&'a str),
}

impl<'a> CredentialRef<'a> {
    /// Parses a reference. A value of neither form (a key pasted where the
    /// reference belongs) is refused without being repeated.
    pub fn parse(s: &'a str) -> Result<Self, String> {
        if let Some(name) = s.strip_prefix("env:") {
            let valid = !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            return if valid {
                Ok(CredentialRef::Env(name))
            } else {
                Err(format!(
                    "`env:` needs a variable name of letters, digits and `_`, got {} characters that are not one",
                    name.chars().count()
                ))
            };
        }
        if let Some(path) = s.strip_prefix("file:") {
            return if path.starts_with('/') {
                Ok(CredentialRef::File(path))
            } else {
                Err(format!(
                    "`file:` needs an absolute path, got {} characters that are not one",
                    path.chars().count()
                ))
            };
        }
        Err("must be `env:NAME` or `file:/path`: a reference to the key, never the key".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_and_bad_ones_never_echo_a_key() {
        assert_eq!(
            CredentialRef::parse("env:OPENAI_API_KEY"),
            Ok(CredentialRef::Env("OPENAI_API_KEY"))
        );
        assert_eq!(
            CredentialRef::parse("file:/run/secrets/openai"),
            Ok(CredentialRef::File("/run/secrets/openai"))
        );
        for bad in ["env:", "env:1X", "env:A-B", "file:relative", ""] {
            assert!(CredentialRef::parse(bad).is_err(), "{bad}");
        }
        for pasted in ["sk-live-123", "env:sk-live-123", "file:sk-live-123"] {
            let e = CredentialRef::parse(pasted).unwrap_err();
            assert!(!e.contains("sk-live"), "{e}");
        }
    }
}
