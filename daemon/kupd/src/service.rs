//! Putting the manager on a bus connection and taking the well-known name.

use std::sync::Arc;

use kup_dbus::{BUS_NAME, MANAGER_PATH};
use zbus::Connection;
use zbus::fdo::RequestNameFlags;

use crate::authority::Authority;
use crate::engine::Engine;
use crate::manager::Manager;

/// kupd could not start serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The manager object could not be exported.
    #[error("kupd could not export {MANAGER_PATH} on the bus ({0}): restart kupd")]
    Export(zbus::Error),
    /// Another process owns the bus name.
    #[error(
        "kupd could not take the bus name {BUS_NAME}: another process owns it (another kupd?): \
         see systemctl status kupd"
    )]
    NameTaken,
    /// The bus refused the name for another reason.
    #[error(
        "kupd could not take the bus name {BUS_NAME} ({0}): check that \
         /usr/share/dbus-1/system.d/org.kup.Manager1.conf is installed and lets root own it"
    )]
    RequestName(zbus::Error),
}

/// Serves `org.kup.Manager1` at `/org/kup/Manager1` on `conn`, then takes the bus name, so no
/// call arrives before the object is there. The name is taken exclusively: a second kupd fails
/// instead of queueing, and cannot steal it from the first.
///
/// # Errors
/// [`ServeError`] when the object cannot be exported or the name cannot be taken.
pub async fn serve(
    conn: &Connection,
    engine: Arc<dyn Engine>,
    authority: Arc<dyn Authority>,
) -> Result<(), ServeError> {
    conn.object_server()
        .at(MANAGER_PATH, Manager::new(engine, authority))
        .await
        .map_err(ServeError::Export)?;
    conn.request_name_with_flags(BUS_NAME, RequestNameFlags::DO_NOT_QUEUE)
        .await
        .map(drop)
        .map_err(|err| match err {
            zbus::Error::NameTaken => ServeError::NameTaken,
            other => ServeError::RequestName(other),
        })
}
