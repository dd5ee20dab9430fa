//! Wire types of the HTTP API (OpenAI chat completions, model list, errors, pruning extension):
//! serde structs only, no behaviour. Requests are checked by `crate::validation`.

pub mod chat;
pub mod error;
pub mod models;
pub mod stream;

pub use chat::{ChatCompletion, ChatRequest};
pub use error::{ErrorBody, ErrorCode, ErrorDetail};
