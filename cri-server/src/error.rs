//! The core's error type and its one mapping to gRPC status codes.

/// Errors of berthd's core services. The variant decides the gRPC code (see
/// [`From<Error> for tonic::Status`]); the message is for people.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed (bad reference, missing field).
    #[error("{0}")]
    InvalidArgument(String),
    /// The named thing does not exist (image, registry manifest).
    #[error("{0}")]
    NotFound(String),
    /// The name or id is taken.
    #[error("{0}")]
    AlreadyExists(String),
    /// The state does not allow the operation.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The operation is not allowed on this object, now or in another state (a predefined
    /// network, one still in use: docker's 403).
    #[error("{0}")]
    Forbidden(String),
    /// A remote (registry) cannot be reached.
    #[error("{0}")]
    Unavailable(String),
    /// Credentials were refused.
    #[error("{0}")]
    Unauthenticated(String),
    /// Content failed verification or is hostile (digest mismatch, unsafe layer, truncated).
    #[error("{0}")]
    BadContent(String),
    /// A remote (registry) answered with an error that fits no other variant.
    #[error("{0}")]
    Remote(String),
    /// A deadline the request set passed (an ExecSync timeout).
    #[error("{0}")]
    DeadlineExceeded(String),
    /// A limit was reached (too many pending streaming requests).
    #[error("{0}")]
    ResourceExhausted(String),
    /// Not built yet.
    #[error("{0} is not implemented by berth yet")]
    Unimplemented(&'static str),
    /// Anything else: a local failure (disk, database).
    #[error("{0}")]
    Internal(String),
}

/// Result with the core's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An internal error from any error, with its whole source chain in the message.
    pub fn internal(context: &str, err: impl std::error::Error) -> Self {
        Error::Internal(format!("{context}: {}", chain(&err)))
    }
}

/// `err: cause: cause…`, the way people read an error.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let m = e.to_string();
        if !s.ends_with(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = e.source();
    }
    s
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let msg = e.to_string();
        match e {
            Error::InvalidArgument(_) => tonic::Status::invalid_argument(msg),
            Error::NotFound(_) => tonic::Status::not_found(msg),
            Error::AlreadyExists(_) => tonic::Status::already_exists(msg),
            Error::FailedPrecondition(_) => tonic::Status::failed_precondition(msg),
            Error::Forbidden(_) => tonic::Status::permission_denied(msg),
            Error::Unavailable(_) => tonic::Status::unavailable(msg),
            Error::Unauthenticated(_) => tonic::Status::unauthenticated(msg),
            Error::BadContent(_) => tonic::Status::data_loss(msg),
            Error::Remote(_) => tonic::Status::unknown(msg),
            Error::DeadlineExceeded(_) => tonic::Status::deadline_exceeded(msg),
            Error::ResourceExhausted(_) => tonic::Status::resource_exhausted(msg),
            Error::Unimplemented(_) => tonic::Status::unimplemented(msg),
            Error::Internal(_) => tonic::Status::internal(msg),
        }
    }
}

impl From<snapshotter::Error> for Error {
    fn from(e: snapshotter::Error) -> Self {
        use snapshotter::Error as S;
        match &e {
            S::DigestMismatch { .. } | S::UnsafeEntry { .. } | S::ReadLayer(_) => {
                Error::BadContent(chain(&e))
            }
            S::NotFound { .. } => Error::NotFound(chain(&e)),
            _ => Error::Internal(chain(&e)),
        }
    }
}

impl From<redb::Error> for Error {
    fn from(e: redb::Error) -> Self {
        Error::internal("metadata store", e)
    }
}

macro_rules! redb_into {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::from(redb::Error::from(e))
            }
        }
    )*};
}
redb_into!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::DatabaseError
);
