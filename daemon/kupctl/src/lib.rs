//! kupctl: the command line client of kupd. It talks only to kupd, over the system bus.

pub mod cli;
pub mod error;
pub mod progress;
pub mod show;
pub mod update;

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use kup_dbus::{Manager1Proxy, StatusReport, UnitReport};
use zbus::Connection;

pub use cli::{Cli, Command};
pub use error::ClientError;
pub use progress::Reporter;
pub use update::{Outcome, follow, start};

/// Entry point of the `kupctl` binary.
#[must_use]
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("kupctl could not start its async runtime: check the memory and thread limits")
        .and_then(|runtime| runtime.block_on(run(cli)).map_err(anyhow::Error::from));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("kupctl: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `cli` against kupd on the system bus.
///
/// # Errors
/// Any [`ClientError`]; its text is what the user sees.
pub async fn run(cli: Cli) -> Result<(), ClientError> {
    let conn = Connection::system().await.map_err(ClientError::Connect)?;
    execute(&conn, cli.command, &mut Reporter::for_stdout()).await
}

/// Runs `command` against kupd over `conn`, printing to stdout (progress on `reporter`).
///
/// # Errors
/// Any [`ClientError`]; its text is what the user sees.
pub async fn execute(
    conn: &Connection,
    command: Command,
    reporter: &mut Reporter,
) -> Result<(), ClientError> {
    match command {
        Command::Update { kernel, append } => {
            let path = start(conn, kernel.as_deref(), append.as_deref()).await?;
            follow(conn, path, reporter).await.map(drop)
        }
        Command::Status { json } => {
            let text = Manager1Proxy::new(conn).await?.status().await?;
            if json {
                println!("{}", show::pretty_json(&text));
            } else {
                print!("{}", show::status_text(&StatusReport::from_json(&text)?));
            }
            Ok(())
        }
        Command::Units { json } => {
            let text = Manager1Proxy::new(conn).await?.units().await?;
            if json {
                println!("{}", show::pretty_json(&text));
            } else {
                print!("{}", show::units_text(&UnitReport::list_from_json(&text)?));
            }
            Ok(())
        }
    }
}
