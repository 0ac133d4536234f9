//! Error details carried inside gRPC statuses.
//!
//! A node answers every failure with a `tonic::Status` whose `details` hold one
//! encoded [`ErrorDetail`]. Its [`ErrorCode`] is what programs branch on; the status
//! message is for people. Statuses without details (transport errors, tonic's own
//! limits) decode to `None`.

use crate::v1::{ErrorCode, ErrorDetail};
use prost::Message;
use tonic::{Code, Status};

/// The gRPC status code that goes with each error code.
pub fn grpc_code(code: ErrorCode) -> Code {
    match code {
        ErrorCode::NotLeader | ErrorCode::WrongEpoch => Code::FailedPrecondition,
        ErrorCode::KeyTooLarge
        | ErrorCode::ValueTooLarge
        | ErrorCode::EmptyKey
        | ErrorCode::NotAnInteger
        | ErrorCode::IncrOverflow
        | ErrorCode::TtlOutOfRange
        | ErrorCode::InvalidArgument => Code::InvalidArgument,
        ErrorCode::OutOfMemory => Code::ResourceExhausted,
        ErrorCode::LsnNotReached => Code::FailedPrecondition,
        ErrorCode::Fenced => Code::FailedPrecondition,
        ErrorCode::Removed | ErrorCode::WrongCluster => Code::FailedPrecondition,
        ErrorCode::Unavailable => Code::Unavailable,
        ErrorCode::Internal | ErrorCode::Unspecified => Code::Internal,
    }
}

impl ErrorDetail {
    /// A detail with only its code set.
    pub fn of(code: ErrorCode) -> Self {
        ErrorDetail {
            code: code as i32,
            ..Default::default()
        }
    }

    /// Wraps this detail and a human-readable message into a status.
    pub fn into_status(self, message: impl Into<String>) -> Status {
        let code = grpc_code(self.code());
        Status::with_details(code, message, self.encode_to_vec().into())
    }

    /// Reads the detail back out of a status; `None` when the status carries none
    /// (or carries bytes that are not an `ErrorDetail`).
    pub fn from_status(status: &Status) -> Option<Self> {
        let details = status.details();
        if details.is_empty() {
            return None;
        }
        ErrorDetail::decode(details).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detail_round_trips_through_a_status() {
        let mut d = ErrorDetail::of(ErrorCode::KeyTooLarge);
        d.limit = Some(16384);
        d.actual = Some(20000);
        let st = d.clone().into_status("key too large");
        assert_eq!(st.code(), Code::InvalidArgument);
        assert_eq!(ErrorDetail::from_status(&st), Some(d));
    }

    #[test]
    fn identity_errors_are_failed_precondition() {
        for code in [ErrorCode::Removed, ErrorCode::WrongCluster] {
            let st = ErrorDetail::of(code).into_status("x");
            assert_eq!(st.code(), Code::FailedPrecondition);
            assert_eq!(ErrorDetail::from_status(&st).map(|d| d.code()), Some(code));
        }
    }

    #[test]
    fn status_without_detail_decodes_to_none() {
        assert_eq!(ErrorDetail::from_status(&Status::unavailable("x")), None);
        let garbage = Status::with_details(Code::Internal, "x", vec![0xff, 0xff].into());
        assert_eq!(ErrorDetail::from_status(&garbage), None);
    }
}
