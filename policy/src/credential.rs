//! The syntax of an endpoint's `credential`: a reference to where a
//! provider key lives, in the sidecar's environment, never the key.
//!
//! One definition for both sides: the control plane checks references with
//! it when it loads the policy, and the sidecar (for requests) and the
//! control plane (for its health probes) read keys with
//! [`CredentialRef::read_key`], the crate's one piece of I/O. Errors never
//! repeat the text they refuse or the key they read: a key pasted where the
//! reference belongs (`env:sk-...`) must not reach a log.

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

    /// The key, read from this process's environment or the file, without
    /// surrounding whitespace.
    pub fn read_key(&self) -> Result<String, KeyError> {
        let key = match self {
            CredentialRef::Env(name) => {
                std::env::var(name).map_err(|_| KeyError::EnvMissing(name.to_string()))?
            }
            CredentialRef::File(path) => {
                std::fs::read_to_string(path).map_err(|e| KeyError::File {
                    path: path.to_string(),
                    reason: e.kind().to_string(),
                })?
            }
        };
        let key = key.trim();
        if key.is_empty() {
            return Err(KeyError::Empty);
        }
        Ok(key.to_string())
    }
}

/// Why a reference gives no key here. Never holds the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    EnvMissing(String),
    File { path: String, reason: String },
    Empty,
}

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyError::EnvMissing(name) => write!(f, "env:{name} is not set"),
            KeyError::File { path, reason } => write!(f, "file:{path} cannot be read: {reason}"),
            KeyError::Empty => f.write_str("the key is empty"),
        }
    }
}

impl std::error::Error for KeyError {}

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
