//! The OpenAI operations the sidecar routes: chat completions, legacy text
//! completions and embeddings. All three go through the same table, classes
//! and accounting; they differ in their path, in what their body must hold,
//! and in which providers' APIs offer them.

/// One routed operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/completions` (legacy text completions).
    Completions,
    /// `POST /v1/embeddings`.
    Embeddings,
}

impl Operation {
    pub const ALL: [Operation; 3] = [
        Operation::Chat,
        Operation::Completions,
        Operation::Embeddings,
    ];

    /// Its path in OpenAI's API, after a base URL's own prefix.
    pub const fn path(self) -> &'static str {
        match self {
            Operation::Chat => "/v1/chat/completions",
            Operation::Completions => "/v1/completions",
            Operation::Embeddings => "/v1/embeddings",
        }
    }

    /// Its path under an Azure OpenAI deployment
    /// (`/openai/deployments/{deployment}/...`).
    pub const fn azure_path(self) -> &'static str {
        match self {
            Operation::Chat => "chat/completions",
            Operation::Completions => "completions",
            Operation::Embeddings => "embeddings",
        }
    }

    /// The operation served at `path`, if any.
    pub fn at(path: &str) -> Option<Operation> {
        Operation::ALL.into_iter().find(|o| o.path() == path)
    }

    /// Whether its answers can be streamed (embeddings cannot).
    pub const fn streams(self) -> bool {
        !matches!(self, Operation::Embeddings)
    }

    /// A short name for messages and metrics.
    pub const fn label(self) -> &'static str {
        match self {
            Operation::Chat => "chat completions",
            Operation::Completions => "completions",
            Operation::Embeddings => "embeddings",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_operation_is_found_at_its_own_path_only() {
        for op in Operation::ALL {
            assert_eq!(Operation::at(op.path()), Some(op));
        }
        assert_eq!(Operation::at("/v1/models"), None);
        assert_eq!(Operation::at("/v1/chat/completions/"), None);
        assert!(Operation::Chat.streams() && !Operation::Embeddings.streams());
    }
}
