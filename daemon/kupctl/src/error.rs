//! What can go wrong between kupctl and kupd, each with what to do about it.

use kup_dbus::{ERROR_PREFIX, PayloadError};

/// A failure of a kupctl command.
///
/// Each message already carries its cause, so no variant has an error source: printing the
/// chain would say everything twice.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No system bus.
    #[error("cannot connect to the system bus ({0}): check that dbus runs (systemctl status dbus)")]
    Connect(zbus::Error),
    /// kupd is not on the bus and could not be activated.
    #[error("kupd is not running: systemctl start kupd (the bus said: {0})")]
    NotRunning(zbus::Error),
    /// The bus policy keeps this user from kupd.
    #[error(
        "the D-Bus policy does not let this user call kupd ({0}): install \
         /usr/share/dbus-1/system.d/org.kup.Manager1.conf and reload dbus"
    )]
    AccessDenied(zbus::Error),
    /// kupd refused the request (`org.kup.Error.*`); the message is kupd's.
    #[error("{message}")]
    Kupd {
        /// The D-Bus error name, e.g. `org.kup.Error.Busy`.
        name: String,
        /// kupd's message.
        message: String,
    },
    /// The update ran and failed before the switch; the message is kupd's.
    #[error("{0}")]
    UpdateFailed(String),
    /// kupd went away in the middle of an update, outside the switch.
    #[error(
        "kupd went away during phase '{phase}' of the update to kernel {target}: see \
         journalctl -u kupd, then kupctl status"
    )]
    Lost {
        /// The last phase seen.
        phase: String,
        /// The target kernel.
        target: String,
    },
    /// Any other bus failure.
    #[error("talking to kupd failed ({0}): see journalctl -u kupd")]
    Bus(zbus::Error),
    /// A command that runs locally (`kupctl stage`) failed; the message names the fix.
    #[error("{0}")]
    Local(String),
    /// kupd answered with JSON this kupctl cannot read.
    #[error(transparent)]
    Payload(#[from] PayloadError),
}

impl ClientError {
    /// The D-Bus error name kupd answered with, for [`ClientError::Kupd`].
    #[must_use]
    pub fn kupd_error_name(&self) -> Option<&str> {
        match self {
            Self::Kupd { name, .. } => Some(name),
            _ => None,
        }
    }
}

impl From<zbus::Error> for ClientError {
    fn from(err: zbus::Error) -> Self {
        use zbus::fdo::Error as Fdo;
        match err {
            zbus::Error::MethodError(name, message, _) if name.starts_with(ERROR_PREFIX) => {
                Self::Kupd {
                    message: message.unwrap_or_else(|| name.to_string()),
                    name: name.to_string(),
                }
            }
            zbus::Error::FDO(ref fdo) => match **fdo {
                Fdo::ServiceUnknown(_)
                | Fdo::NameHasNoOwner(_)
                | Fdo::SpawnExecFailed(_)
                | Fdo::SpawnChildExited(_)
                | Fdo::SpawnChildSignaled(_)
                | Fdo::SpawnFailed(_)
                | Fdo::SpawnServiceNotFound(_)
                | Fdo::SpawnServiceNotValid(_)
                | Fdo::SpawnFileInvalid(_)
                | Fdo::SpawnNoMemory(_)
                | Fdo::SpawnPermissionsInvalid(_)
                | Fdo::SpawnFailedToSetup(_)
                | Fdo::SpawnConfigInvalid(_)
                | Fdo::SpawnForkFailed(_) => Self::NotRunning(err),
                Fdo::AccessDenied(_) => Self::AccessDenied(err),
                _ => Self::Bus(err),
            },
            other => Self::Bus(other),
        }
    }
}
