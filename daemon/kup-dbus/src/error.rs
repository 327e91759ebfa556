//! Errors of the contract: the D-Bus errors kupd replies with, and JSON payload decoding.

use std::fmt;

use zbus::DBusError;

/// An error reply of kupd, named `org.kup.Error.<Variant>` on the bus.
///
/// The text of each variant is a full sentence for a human: what was refused or failed, why,
/// and what to do about it. Clients show it as it is.
#[derive(Debug, DBusError)]
#[zbus(prefix = "org.kup.Error", impl_display = false)]
pub enum KupError {
    /// A bus-level failure (reported as the D-Bus error it carries).
    #[zbus(error)]
    ZBus(zbus::Error),
    /// The caller lacks the polkit authorization for the action.
    NotAuthorized(String),
    /// Another update is running; only one runs at a time.
    Busy(String),
    /// The engine refused the update before touching any service.
    Refused(String),
    /// The `Update` options hold an unknown key or a value of the wrong type.
    InvalidArgs(String),
    /// kupd itself failed (polkit unreachable, bus trouble, internal error).
    Failed(String),
}

impl fmt::Display for KupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ZBus(err) => write!(f, "{err}"),
            Self::NotAuthorized(msg)
            | Self::Busy(msg)
            | Self::Refused(msg)
            | Self::InvalidArgs(msg)
            | Self::Failed(msg) => f.write_str(msg),
        }
    }
}

/// A JSON payload of kupd (`Status`, `Units`) that does not decode.
#[derive(Debug, thiserror::Error)]
#[error(
    "kupd sent a {what} payload this client cannot read ({error}); \
     kupd and kupctl are probably from different kup versions: reinstall kup so both match"
)]
pub struct PayloadError {
    /// Which payload (`Status` or `Units`).
    pub what: &'static str,
    /// The decoding error (already part of the message, so not a source).
    pub error: serde_json::Error,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names;

    #[test]
    fn error_names_match_the_constants() {
        let cases = [
            (
                KupError::NotAuthorized(String::new()),
                names::ERROR_NOT_AUTHORIZED,
            ),
            (KupError::Busy(String::new()), names::ERROR_BUSY),
            (KupError::Refused(String::new()), names::ERROR_REFUSED),
            (
                KupError::InvalidArgs(String::new()),
                names::ERROR_INVALID_ARGS,
            ),
            (KupError::Failed(String::new()), names::ERROR_FAILED),
        ];
        for (err, name) in cases {
            assert_eq!(err.name().as_str(), name);
        }
    }

    #[test]
    fn display_is_the_bare_message() {
        let err = KupError::Busy("kupd: an update is already running".into());
        assert_eq!(err.to_string(), "kupd: an update is already running");
        assert_eq!(
            err.description(),
            Some("kupd: an update is already running")
        );
    }
}
