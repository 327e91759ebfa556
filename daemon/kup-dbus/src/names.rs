//! Well-known names of kupd on the bus: service, objects, interfaces, polkit actions, errors.

use zbus::OwnedObjectPath;

/// Well-known bus name kupd owns on the system bus.
pub const BUS_NAME: &str = "org.kup.Manager1";
/// Object path of the manager object.
pub const MANAGER_PATH: &str = "/org/kup/Manager1";
/// Interface of the manager object.
pub const MANAGER_INTERFACE: &str = "org.kup.Manager1";
/// Prefix of update object paths; the N-th update lives at `{UPDATE_PATH_PREFIX}/N`.
pub const UPDATE_PATH_PREFIX: &str = "/org/kup/Manager1/update";
/// Interface of each update object.
pub const UPDATE_INTERFACE: &str = "org.kup.Update1";

/// Polkit action checked before kupd starts a kernel update.
pub const ACTION_UPDATE: &str = "org.kup.update";
/// Polkit action checked before kupd starts a dry run.
pub const ACTION_DRY_RUN: &str = "org.kup.dry-run";

/// Prefix of the D-Bus error names kupd replies with (see [`crate::KupError`]).
pub const ERROR_PREFIX: &str = "org.kup.Error";
/// Error name: the caller lacks the polkit authorization.
pub const ERROR_NOT_AUTHORIZED: &str = "org.kup.Error.NotAuthorized";
/// Error name: another update is running.
pub const ERROR_BUSY: &str = "org.kup.Error.Busy";
/// Error name: the engine refused the update before touching anything.
pub const ERROR_REFUSED: &str = "org.kup.Error.Refused";
/// Error name: the options dictionary of `Update` holds an unknown key or a value of the wrong type.
pub const ERROR_INVALID_ARGS: &str = "org.kup.Error.InvalidArgs";
/// Error name: kupd itself failed (bus or polkit trouble).
pub const ERROR_FAILED: &str = "org.kup.Error.Failed";

/// Object path of the update numbered `n` (`/org/kup/Manager1/update/N`).
#[must_use]
pub fn update_path(n: u64) -> OwnedObjectPath {
    OwnedObjectPath::try_from(format!("{UPDATE_PATH_PREFIX}/{n}"))
        .unwrap_or_else(|_| OwnedObjectPath::default())
}

/// The error name of a D-Bus method error reply (e.g. `org.kup.Error.Busy`), if `err` is one.
#[must_use]
pub fn error_name(err: &zbus::Error) -> Option<String> {
    match err {
        zbus::Error::MethodError(name, _, _) => Some(name.to_string()),
        zbus::Error::FDO(fdo) => {
            use zbus::DBusError as _;
            Some(fdo.name().to_string())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_paths_are_numbered_children_of_the_manager() {
        assert_eq!(update_path(7).as_str(), "/org/kup/Manager1/update/7");
        assert!(update_path(0).as_str().starts_with(MANAGER_PATH));
    }

    #[test]
    fn error_names_share_the_prefix() {
        for name in [
            ERROR_NOT_AUTHORIZED,
            ERROR_BUSY,
            ERROR_REFUSED,
            ERROR_INVALID_ARGS,
            ERROR_FAILED,
        ] {
            assert!(name.starts_with(ERROR_PREFIX), "{name}");
        }
    }
}
