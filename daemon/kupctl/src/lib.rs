//! kupctl: the command line client of kupd. It talks only to kupd, over the system bus.

pub mod cli;
pub mod dpkg;
pub mod error;
pub mod progress;
pub mod show;
pub mod update;

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use kup_dbus::{DryRunReport, Manager1Proxy, StatusReport, UnitReport};
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
    match cli.command {
        Command::Stage {
            version,
            no_schedule,
        } => stage(&version, no_schedule),
        Command::Update {
            json: true,
            kernel,
            append,
            wait_dpkg,
        } => {
            let mut reporter = Reporter::json(std::io::stdout());
            let command = Command::Update {
                kernel,
                append,
                json: true,
                wait_dpkg,
            };
            let result = async {
                let conn = Connection::system().await.map_err(ClientError::Connect)?;
                execute(&conn, command, &mut reporter).await
            }
            .await;
            if let Err(err) = &result {
                reporter.json_result(false, &err.to_string());
            }
            result
        }
        Command::Initrds { fix } => initrds(fix),
        command => {
            let conn = Connection::system().await.map_err(ClientError::Connect)?;
            execute(&conn, command, &mut Reporter::for_stdout()).await
        }
    }
}

/// `kupctl initrds [--fix]`: each installed kernel's initrd and kup's hook in it.
fn initrds(fix: bool) -> Result<(), ClientError> {
    use kup::initrd;
    let boot = std::path::Path::new(kup::stage::BOOT_DIR);
    let kernels = kup::stage::installed_kernels(boot).map_err(|e| {
        ClientError::Local(format!("kupctl cannot list the installed kernels: {e}"))
    })?;
    let mut failed = Vec::new();
    for kernel in &kernels {
        let path = boot.join(&kernel.initrd);
        if initrd::has_module(&path) {
            println!("{}  {}  has kup's hook", kernel.version, path.display());
            continue;
        }
        if !fix {
            let how = initrd::Generator::detect().map_or_else(
                || "install dracut or initramfs-tools".to_owned(),
                |g| g.rebuild_command(&kernel.version),
            );
            println!(
                "{}  {}  LACKS kup's hook: kup cannot update to this kernel; fix: {how}",
                kernel.version,
                path.display()
            );
            continue;
        }
        match initrd::rebuild(&kernel.version) {
            Ok(g) if initrd::has_module(&path) => println!(
                "{}  {}  rebuilt with kup's hook ({})",
                kernel.version,
                path.display(),
                g.rebuild_command(&kernel.version)
            ),
            Ok(g) => failed.push(format!(
                "{} still lacks kup's hook after {}: check that kup's dracut module or initramfs-tools hook is installed (reinstall kup)",
                path.display(),
                g.rebuild_command(&kernel.version)
            )),
            Err(e) => failed.push(e.to_string()),
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(ClientError::Local(failed.join("\n")))
    }
}

/// `kupctl stage VER`: the kernel install hooks' entry point, local and without kupd.
fn stage(version: &str, no_schedule: bool) -> Result<(), ClientError> {
    use kup::install;
    let settings = kup::config::Settings::load()
        .map_err(|e| ClientError::Local(format!("kup cannot stage kernel {version}: {e}")))?;
    let staged = install::stage_kernel(
        std::path::Path::new(kup::stage::BOOT_DIR),
        version,
        std::path::Path::new(install::STAGED_FRAGMENT),
    )
    .map_err(|e| ClientError::Local(e.to_string()))?;
    if let Some(command) = &staged.rebuilt_with {
        println!("kupctl: the initrd of {version} lacked kup's hook: rebuilt it ({command})");
    }
    println!(
        "kupctl: kernel {version} staged ({}, {} carries kup's hook)",
        staged.kernel.vmlinuz.display(),
        staged.kernel.initrd.display()
    );
    let auto = if no_schedule {
        install::Auto::Off
    } else {
        settings.update.auto
    };
    let said = install::schedule(version, auto).map_err(|e| ClientError::Local(e.to_string()))?;
    println!("kupctl: {said}");
    Ok(())
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
        Command::Update {
            kernel,
            append,
            wait_dpkg,
            json: _,
        } => {
            if wait_dpkg {
                dpkg::wait(&mut |text| reporter.note(text)).await;
            }
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
        Command::Stage {
            version,
            no_schedule,
        } => stage(&version, no_schedule),
        Command::Initrds { fix } => initrds(fix),
        Command::DryRun { kernel, json } => {
            let text = Manager1Proxy::new(conn)
                .await?
                .dry_run(kernel.as_deref().unwrap_or_default())
                .await?;
            let report = DryRunReport::from_json(&text)?;
            if json {
                println!("{}", show::pretty_json(&text));
            } else {
                print!("{}", show::dry_run_text(&report));
            }
            let not = report.units.iter().filter(|u| !u.restorable).count();
            if not > 0 || !report.refusal.is_empty() {
                return Err(ClientError::Local(format!(
                    "dry-run: {not} of {} unit(s) not restorable{}",
                    report.units.len(),
                    if report.refusal.is_empty() {
                        ""
                    } else {
                        ", and the update would be refused"
                    }
                )));
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
