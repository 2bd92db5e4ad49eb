//! The errors that end a command before or while it runs, typed to the edge: each kind
//! names its culprit (a config key, a file, an address) and maps to the process's exit
//! status ([`Error::exit_code`]): 2 for what the operator must fix (configuration,
//! model files, state files, an address in use), 1 for failures of the machine or of
//! the daemon itself.

use std::net::SocketAddr;

use crate::config::ConfigError;
use crate::http::auth::TokenError;
use crate::ingest::IngestError;
use crate::labels::LabelError;
use crate::score::LoadError;

/// Why `run`, `scan`, `score` or `eval` stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad configuration; the message starts with the key.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The model bundle, its prompt set or ONNX Runtime; the message names the file.
    #[error(transparent)]
    Model(#[from] LoadError),
    /// The prompt set `model.prompts_dir/active` names cannot be used.
    #[error("model.prompts_dir: {0}")]
    PromptSet(#[source] crate::score::prompts::PromptError),
    /// `server.api_token_file` could not be read or created.
    #[error("server.api_token_file: {0}")]
    ApiToken(#[source] TokenError),
    /// `labels.db` could not be opened or created.
    #[error("labels.db: {0}")]
    Labels(#[source] LabelError),
    /// GStreamer could not be initialised.
    #[error(transparent)]
    Ingest(#[from] IngestError),
    /// `server.listen` could not be bound.
    #[error("server.listen = {addr}: cannot bind: {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A thread, task or server of the daemon failed.
    #[error("{what}: {message}")]
    Runtime {
        /// Which part.
        what: &'static str,
        /// What happened.
        message: String,
    },
}

impl Error {
    /// The process exit status for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_)
            | Self::Model(_)
            | Self::PromptSet(_)
            | Self::ApiToken(_)
            | Self::Labels(_)
            | Self::Bind { .. } => 2,
            Self::Ingest(_) | Self::Runtime { .. } => 1,
        }
    }

    /// A runtime failure of `what`.
    pub fn runtime(what: &'static str, message: impl std::fmt::Display) -> Self {
        Self::Runtime {
            what,
            message: message.to_string(),
        }
    }
}
