//! The `kupd` program: connect to the system bus, serve, stop on SIGTERM.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info};
use zbus::Connection;

use crate::authority::PolkitAuthority;
use crate::engine::{Engine, default_engine};
use crate::logging;
use crate::service::serve;

const USAGE: &str = "usage: kupd [--version]\n\
    kupd is the kup system service; systemd starts it (kupd.service) or D-Bus activates it \
    (org.kup.Manager1). Talk to it with kupctl.";

/// Entry point of the `kupd` binary.
#[must_use]
pub fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        None => {}
        Some("--version" | "-V") => {
            println!("kupd {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Some("--help" | "-h") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!("kupd: unknown argument '{other}': kupd takes none\n{USAGE}");
            return ExitCode::from(2);
        }
    }
    logging::init();
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
            version = env!("CARGO_PKG_VERSION"),
            name = kup_dbus::BUS_NAME,
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
