//! OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`.

use serde::{Deserialize, Serialize};

/// The JSON body of every error response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error itself.
    pub error: ErrorDetail,
}

/// What went wrong, in OpenAI's field names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Human-readable explanation.
    pub message: String,
    /// Category, e.g. `invalid_request_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault (`messages[0].content[1].image_url.url`), if one is.
    pub param: Option<String>,
    /// Machine-readable code, e.g. `image_too_large`.
    pub code: Option<String>,
}

/// Defines [`ErrorCode`] with the wire name of every variant.
macro_rules! error_codes {
    ($($(#[doc = $doc:literal])* $variant:ident = $name:literal,)*) => {
        /// The machine-readable `code` of an error response: one enum, so code is matched by
        /// variant, never by comparing strings, and the wire names are listed in one place.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $($(#[doc = $doc])* $variant,)*
        }

        impl ErrorCode {
            /// Every code (for documentation checks).
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            /// The wire name.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $name,)*
                }
            }
        }
    };
}

error_codes! {
    /// A field is out of range or conflicts with another.
    InvalidValue = "invalid_value",
    /// A field has the wrong JSON type or is missing.
    InvalidType = "invalid_type",
    /// The body is not one JSON value.
    InvalidJson = "invalid_json",
    /// The body could not be read.
    InvalidBody = "invalid_body",
    /// A known OpenAI parameter this server does not implement.
    UnsupportedParameter = "unsupported_parameter",
    /// A value this server does not implement (`n` > 1).
    UnsupportedValue = "unsupported_value",
    /// The prompt, or the prompt plus `max_tokens`, exceeds the context.
    ContextLengthExceeded = "context_length_exceeded",
    /// `max_tokens` needs more KV-cache memory than the server has (`--kv-cache-mib`).
    KvCacheExceeded = "kv_cache_exceeded",
    /// The conversation does not fit the model (placeholders vs images).
    InvalidInput = "invalid_input",
    /// The model's chat template refused the conversation.
    TemplateRejected = "template_rejected",
    /// Image bytes that are not a complete PNG, JPEG, WebP or GIF.
    InvalidImage = "invalid_image",
    /// An image URL that is malformed or of an unsupported scheme.
    InvalidImageUrl = "invalid_image_url",
    /// An image URL on a private, loopback or link-local address.
    ImageUrlPrivate = "image_url_private",
    /// Fetching an image URL failed.
    ImageFetchFailed = "image_fetch_failed",
    /// An image over the byte limit.
    ImageTooLarge = "image_too_large",
    /// An image over the pixel limit.
    ImageTooManyPixels = "image_too_many_pixels",
    /// An image format that is not supported.
    UnsupportedImageFormat = "unsupported_image_format",
    /// More images than allowed per request.
    TooManyImages = "too_many_images",
    /// A dataset file that cannot be parsed.
    InvalidDataset = "invalid_dataset",
    /// Dataset input without `--calibration-data-dir`.
    DatasetDisabled = "dataset_disabled",
    /// A dataset path that is not a readable regular file inside the data root.
    DatasetUnreadable = "dataset_unreadable",
    /// A dataset file over its size cap.
    DatasetTooLarge = "dataset_too_large",
    /// A calibration or evaluation job whose images exceed its memory cap.
    CalibrationTooLarge = "calibration_too_large",
    /// A recipe that does not fit the loaded model.
    InvalidRecipe = "invalid_recipe",
    /// An unknown built-in scheme name.
    UnknownScheme = "unknown_scheme",
    /// Cancelling a job that already ended.
    JobFinished = "job_finished",
    /// `after` names no row of the listing.
    InvalidCursor = "invalid_cursor",
    /// Unknown job id.
    JobNotFound = "job_not_found",
    /// Unknown recipe id.
    RecipeNotFound = "recipe_not_found",
    /// An evaluation budget that no recipe realises (none at or below it).
    NoRecipe = "no_recipe",
    /// Unknown evaluation id.
    EvaluationNotFound = "evaluation_not_found",
    /// Unknown model name.
    ModelNotFound = "model_not_found",
    /// No such route.
    UnknownRoute = "unknown_route",
    /// The route exists with other methods.
    MethodNotAllowed = "method_not_allowed",
    /// The body is over the size limit.
    RequestTooLarge = "request_too_large",
    /// Missing or wrong credentials.
    InvalidApiKey = "invalid_api_key",
    /// The route is disabled on this server.
    Forbidden = "forbidden",
    /// The queue is full (429).
    QueueFull = "queue_full",
    /// The model is still loading (503).
    ModelLoading = "model_loading",
    /// The model failed to load (503).
    ModelLoadFailed = "model_load_failed",
    /// The server is shutting down (503).
    ShuttingDown = "shutting_down",
    /// The engine thread stopped (503).
    EngineStopped = "engine_stopped",
    /// The request ran past `--request-timeout` (503).
    RequestTimeout = "request_timeout",
    /// The calibration thread stopped (503).
    CalibrationStopped = "calibration_stopped",
    /// The evaluation thread stopped (503).
    EvaluationStopped = "evaluation_stopped",
    /// A server fault (500).
    InternalError = "internal_error",
}
