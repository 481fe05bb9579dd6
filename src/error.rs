//! The crate's error type.
//!
//! Every fallible public function returns [`Result<T>`]. Errors name the thing that is wrong
//! (the file, the tensor, the field, the setting) so that a user can fix it without reading
//! the source.

use std::path::PathBuf;

/// Errors returned by yoco.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `params.json` (or a [`crate::Config`] built in code) describes an impossible model.
    #[error("invalid config: {0}")]
    Config(String),

    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A JSON file (params.json, a shard index) is not what it should be.
    #[error("cannot parse {path}: {message}")]
    Json {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },

    /// The model directory has no weights in any supported layout.
    #[error("no weights found in {0}: expected model.safetensors, model.safetensors.index.json with its shards, checkpoint.pth or model.gguf")]
    NoWeights(PathBuf),

    /// A weight file is corrupt, or its tensors do not match the config.
    #[error("checkpoint: {0}")]
    Checkpoint(String),

    /// A tensor the model needs is absent from the checkpoint.
    #[error("checkpoint is missing tensor `{name}` (expected shape {expected:?})")]
    MissingTensor {
        /// Reference parameter name.
        name: String,
        /// Shape the config implies.
        expected: Vec<usize>,
    },

    /// A tensor has a shape other than the one the config implies.
    #[error("tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        /// Reference parameter name.
        name: String,
        /// Shape the config implies.
        expected: Vec<usize>,
        /// Shape found in the checkpoint.
        actual: Vec<usize>,
    },

    /// The checkpoint holds tensors the model does not use (strict loading).
    #[error("checkpoint has unexpected tensors: {0}")]
    UnexpectedTensors(String),

    /// Bad input to a forward pass or to generation: empty prompt, out-of-range token id,
    /// a sequence beyond the configured position limit, wrong batch size, and so on.
    #[error("invalid input: {0}")]
    Input(String),

    /// A generation setting out of range (temperature, top-p, ...).
    #[error("invalid generation setting: {0}")]
    Generation(String),

    /// Tokenizer file missing or invalid, or a tokenizer call failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A chat template that does not parse, fails while rendering (an undefined call, a
    /// `raise_exception`, running out of its budget), or messages it cannot take.
    #[error("chat template: {0}")]
    ChatTemplate(String),

    /// An [`crate::Engine`]'s queue is full: try again later.
    #[error("busy: {0}")]
    Busy(String),

    /// An [`crate::Engine`] has stopped, or a sequence failed inside it.
    #[error("engine: {0}")]
    Engine(String),

    /// The requested device is not available in this build or on this machine.
    #[error("device: {0}")]
    Device(String),

    /// An error from candle (tensor maths, device, safetensors parsing).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
