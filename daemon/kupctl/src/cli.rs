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
        /// Print progress and the result as JSON lines (one object per line) for scripts.
        #[arg(long)]
        json: bool,
        /// First wait until no package manager (dpkg, apt) holds the dpkg lock, so an update
        /// scheduled by a kernel install never switches kernel in the middle of a package run.
        #[arg(long)]
        wait_dpkg: bool,
    },
    /// Stage an installed kernel (what the kernel install hooks run): check its image and
    /// initrd, rebuild the initrd when it lacks kup's hook, make it the target of the next
    /// update and schedule that update as `[update] auto` in kup.toml says. Runs locally, as
    /// root, without kupd.
    Stage {
        /// Kernel release, as `uname -r` prints it, e.g. 6.12.117+deb13-cloud-amd64.
        #[arg(value_name = "VER")]
        version: String,
        /// Only check and stage; do not schedule the update whatever `[update] auto` says.
        #[arg(long)]
        no_schedule: bool,
    },
    /// List the installed kernels and whether each initrd carries kup's early-boot hook (the
    /// dracut module or the initramfs-tools hook). Runs locally, without kupd.
    Initrds {
        /// Rebuild the initrds that lack the hook (the package's postinst runs this).
        #[arg(long)]
        fix: bool,
    },
    /// Dry-run an update: checkpoint every marked unit while it keeps running (each pauses for
    /// its dump), check the checkpoints, restore them on the target kernel in a throwaway VM
    /// (QEMU over a copy-on-write view of the root filesystem, no network; health commands run
    /// there; `dry_run_vm_timeout` in kup.toml), switch nothing, and say per unit whether it is
    /// restorable and why not. Exits 1 when a unit is not, or the update would be refused.
    DryRun {
        /// Kernel release an update would switch to (default: the newest installed or staged).
        #[arg(long, value_name = "VER")]
        kernel: Option<String>,
        /// Print kupd's JSON report instead of a table.
        #[arg(long)]
        json: bool,
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
        let Command::Update {
            kernel,
            append,
            json,
            wait_dpkg,
        } = cli.command
        else {
            panic!("not update");
        };
        assert_eq!(kernel.as_deref(), Some("7.3.4"));
        assert_eq!(append.as_deref(), Some("-- quiet"));
        assert!(!json && !wait_dpkg);
    }

    #[test]
    fn stage_takes_a_version() {
        let cli =
            Cli::try_parse_from(["kupctl", "stage", "6.12.117", "--no-schedule"]).expect("parses");
        assert!(matches!(
            cli.command,
            Command::Stage { ref version, no_schedule: true } if version == "6.12.117"
        ));
        assert!(Cli::try_parse_from(["kupctl", "stage"]).is_err());
    }
}
