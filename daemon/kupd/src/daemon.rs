//! The `kupd` program: connect to the system bus, serve, stop on SIGTERM.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info};
use zbus::Connection;

use crate::authority::PolkitAuthority;
use crate::engine::{Engine, default_engine};
use crate::service::serve;

/// Entry point of the `kupd` binary.
#[must_use]
pub fn main() -> ExitCode {
    // --help, --version and unknown arguments (exit status 2) are clap's.
    crate::cli::command().get_matches();
    kup::logging::init("kupd");
    #[cfg(feature = "failpoints")]
    match kup::failpoints::arm_from_cmdline() {
        Ok(armed) if !armed.is_empty() => tracing::warn!("failpoints armed: {}", armed.join(", ")),
        Ok(_) => {}
        Err(e) => error!("failpoints not armed: {e}"),
    }
    match run(default_engine()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            error!("{err:#}");
            eprintln!("{err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Serves `engine` on the system bus until SIGTERM or SIGINT.
///
/// # Errors
/// When the runtime, the bus connection or the bus name cannot be had.
pub fn run(engine: Arc<dyn Engine>) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("kupd could not start its async runtime: check the memory and thread limits of kupd.service")?;
    runtime.block_on(async move {
        let conn = Connection::system().await.context(
            "kupd could not connect to the system bus: check that dbus is running (systemctl status dbus)",
        )?;
        let authority = Arc::new(PolkitAuthority::new(conn.clone()));
        serve(&conn, engine, authority).await?;
        info!(
            kup_version = env!("CARGO_PKG_VERSION"),
            kup_bus_name = kup_dbus::BUS_NAME,
            "kupd is ready"
        );
        wait_for_stop().await?;
        info!("kupd is stopping");
        Ok(())
    })
}

async fn wait_for_stop() -> Result<()> {
    let mut term = signal(SignalKind::terminate()).context(
        "kupd could not watch SIGTERM: check the seccomp/signal settings of kupd.service",
    )?;
    let mut int = signal(SignalKind::interrupt()).context(
        "kupd could not watch SIGINT: check the seccomp/signal settings of kupd.service",
    )?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
