//! The command line of kupctl.

use clap::{Parser, Subcommand};

/// Kernel updates that running services don't notice: ask kupd to checkpoint the marked
/// units, switch kernel with kexec, and restore them.
#[derive(Debug, Parser)]
#[command(name = "kupctl", version)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Update to a kernel now (default: the newest installed or the staged one).
    Update {
        /// Kernel release to switch to, e.g. 6.12.117+deb13-cloud-amd64.
        #[arg(long, value_name = "VER")]
        kernel: Option<String>,
        /// Extra kernel command line arguments for the new kernel, as one string.
        #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
        append: Option<String>,
    },
    /// Show what kupd is doing and what it would update to.
    Status {
        /// Print kupd's JSON report instead of a summary.
        #[arg(long)]
        json: bool,
    },
    /// List the marked units and whether each can be checkpointed now.
    Units {
        /// Print kupd's JSON list instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn the_cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn update_takes_kernel_and_append() {
        let cli = Cli::try_parse_from([
            "kupctl", "update", "--kernel", "7.3.4", "--append", "-- quiet",
        ])
        .expect("parses");
        let Command::Update { kernel, append } = cli.command else {
            panic!("not update");
        };
        assert_eq!(kernel.as_deref(), Some("7.3.4"));
        assert_eq!(append.as_deref(), Some("-- quiet"));
    }
}
