//! `kupctl update`: start an update and follow it to its end.

use std::collections::HashMap;

use futures_util::StreamExt as _;
use kup_dbus::{Manager1Proxy, Update1Proxy, options, phase};
use zbus::proxy::CacheProperties;
use zbus::{Connection, OwnedObjectPath, Variant};

use crate::error::ClientError;
use crate::progress::Reporter;

/// How a followed update ended, when it did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// kupd reported success (`Finished(true, message)`).
    Done {
        /// Target kernel release.
        target: String,
        /// kupd's message.
        message: String,
    },
    /// kupd went away during the `switch` phase: the machine is kexecing into the target.
    Switching {
        /// Target kernel release.
        target: String,
    },
}

/// Asks kupd to update to `kernel` (None: the newest installed or staged one) with the extra
/// command line `append`, and returns the new update object.
///
/// # Errors
/// [`ClientError::Kupd`] when kupd refuses (not authorized, busy, refused, bad options), or a
/// bus failure.
pub async fn start(
    conn: &Connection,
    kernel: Option<&str>,
    append: Option<&str>,
) -> Result<OwnedObjectPath, ClientError> {
    let manager = Manager1Proxy::new(conn).await?;
    let mut opts: HashMap<&str, Variant<'_>> = HashMap::new();
    if let Some(append) = append {
        opts.insert(options::APPEND, Variant::from(append));
    }
    Ok(manager.update(kernel.unwrap_or(""), opts).await?)
}

/// Follows the update at `path` to its end, showing progress on `reporter`.
///
/// It subscribes to `Progress` and `Finished` first and reads the properties after, so an update
/// that ends in between is still seen. Losing kupd during the `switch` phase is the machine
/// kexecing away: [`Outcome::Switching`].
///
/// # Errors
/// [`ClientError::UpdateFailed`] with kupd's message when the update failed,
/// [`ClientError::Lost`] when kupd went away before the switch, or a bus failure.
pub async fn follow(
    conn: &Connection,
    path: OwnedObjectPath,
    reporter: &mut Reporter,
) -> Result<Outcome, ClientError> {
    let update = Update1Proxy::builder(conn)
        .path(path.clone())
        .cache_properties(CacheProperties::No)
        .build()
        .await?;
    let mut progress = update.receive_progress().await?;
    let mut finished = update.receive_finished().await?;
    let mut owner = update.inner().receive_owner_changed().await?;

    let target = update.target().await?;
    let mut last_phase = update.phase().await?;
    if phase::is_terminal(&last_phase) {
        let message = update.message().await?;
        return conclude(last_phase == phase::DONE, message, target, reporter);
    }
    let percentage = update.percentage().await?;
    reporter.note(&format!("kupctl: updating to kernel {target} ({path})"));
    reporter.progress(&last_phase, percentage);

    let closed = conn.closed();
    tokio::pin!(closed);
    loop {
        tokio::select! {
            biased;
            signal = progress.next() => {
                let Some(signal) = signal else { break };
                if let Ok(args) = signal.args() {
                    last_phase = args.phase().to_string();
                    reporter.progress(&last_phase, *args.percentage());
                }
            }
            signal = finished.next() => {
                let Some(signal) = signal else { break };
                let args = signal.args()?;
                return conclude(*args.success(), args.message().to_string(), target, reporter);
            }
            change = owner.next() => {
                // `Some(None)`: kupd's name lost its owner; `None`: the stream ended.
                if !matches!(change, Some(Some(_))) {
                    break;
                }
            }
            () = &mut closed => break,
        }
    }

    if last_phase == phase::SWITCH {
        reporter.finish(&format!(
            "kupctl: the machine is switching to kernel {target} (kexec); the services come \
             back on it. Check with `uname -r` and `kupctl status` once it answers again."
        ));
        Ok(Outcome::Switching { target })
    } else {
        reporter.abandon();
        Err(ClientError::Lost {
            phase: last_phase,
            target,
        })
    }
}

fn conclude(
    success: bool,
    message: String,
    target: String,
    reporter: &mut Reporter,
) -> Result<Outcome, ClientError> {
    if success {
        reporter.finish(&message);
        Ok(Outcome::Done { target, message })
    } else {
        reporter.abandon();
        Err(ClientError::UpdateFailed(message))
    }
}
