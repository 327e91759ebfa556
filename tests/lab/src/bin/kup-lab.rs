//! `lab`: the lab's command line (see docs/LAB.md); a shim over the kup_lab library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use kup_lab::{image, recipe::Recipe, vm};

#[derive(Parser)]
#[command(
    name = "lab",
    about = "Boot, drive and kexec Debian guests under QEMU/TCG for kup's tests"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the guest image, or reuse the cached one, and print its directory.
    Image,
    /// Boot a guest from a fresh overlay of the image; return when it reaches multi-user.target.
    ///
    /// By default QEMU loads the kernel itself (-kernel/-initrd/-append), and a guest reset boots that
    /// kernel again. With --firmware, UEFI firmware (OVMF, Debian's ovmf package) boots systemd-boot
    /// from the guest's ESP disk, which boots its default entry (the --kernel's), or the one-shot
    /// entry set with `bootctl set-oneshot`; a reset (panic, watchdog, reboot) goes through the
    /// firmware and systemd-boot again. KUP_LAB_APPEND does not apply to firmware boots.
    Start {
        /// Kernel to boot (Debian ABI name, e.g. 6.12.107+deb13-cloud-amd64); default: the recipe's
        /// first. With --firmware: its boot entry becomes systemd-boot's default.
        #[arg(long)]
        kernel: Option<String>,
        /// Boot through UEFI firmware and systemd-boot instead of QEMU's -kernel.
        #[arg(long)]
        firmware: bool,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 2048)]
        mem: u32,
        /// Guest CPUs.
        #[arg(long, default_value_t = 2)]
        cpus: u32,
        /// Forward 127.0.0.1:HOSTPORT on the host to GUESTPORT in the guest (repeatable).
        #[arg(long = "forward", value_name = "HOSTPORT:GUESTPORT")]
        forwards: Vec<String>,
        /// A directory copied over the guest's / at first boot (the project's install tree).
        #[arg(long, env = "KUP_LAB_PAYLOAD_TREE")]
        payload_tree: Option<PathBuf>,
        /// Seconds to wait for multi-user.target.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// The root disk's overlay honours the guest's flushes (QEMU cache=writeback instead of
        /// unsafe): after a `sync` in the guest, the overlay file on the host holds everything
        /// written before it, so a second QEMU on the host may read it (the dry-run test).
        #[arg(long)]
        disk_flush: bool,
    },
    /// Run CMD as root in the guest through a shell; exits with CMD's status.
    Exec {
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            required = true,
            value_name = "CMD"
        )]
        cmd: Vec<String>,
    },
    /// Wait until the guest answers again from a new boot (after kexec or reboot).
    Wait {
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// A kernel crash on the console before the new boot (an injected panic) is expected.
        #[arg(long)]
        crash_ok: bool,
    },
    /// Print the guest's serial console log so far.
    Console,
    /// Power the guest off and clean up.
    Stop,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let is_exec = matches!(cli.cmd, Cmd::Exec { .. });
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lab: {e:#}");
            // exec passes the command's own status through, so lab's own failures use 255 (as ssh does)
            ExitCode::from(if is_exec { 255 } else { 1 })
        }
    }
}

fn recipe() -> Result<Recipe> {
    Recipe::load(&Recipe::default_dir(), std::env::vars())
}

fn run(cli: Cli) -> Result<ExitCode> {
    let dir = vm::run_dir();
    match cli.cmd {
        Cmd::Image => {
            let img = image::ensure(&recipe()?)?;
            println!("{}", img.dir.display());
        }
        Cmd::Start {
            kernel,
            firmware,
            mem,
            cpus,
            forwards,
            payload_tree,
            timeout,
            disk_flush,
        } => {
            let recipe = recipe()?;
            let forwards = forwards
                .iter()
                .map(|f| vm::parse_forward(f))
                .collect::<Result<Vec<_>>>()?;
            let kernel = match kernel {
                Some(k) => k,
                None => recipe
                    .kernels()
                    .first()
                    .cloned()
                    .ok_or_else(|| anyhow::anyhow!("the recipe lists no KERNELS"))?,
            };
            let img = image::ensure(&recipe)?;
            let opts = vm::StartOptions {
                kernel,
                mem_mib: mem,
                cpus,
                forwards,
                payload_tree,
                boot_timeout: Duration::from_secs(timeout),
                firmware,
                disk_flush,
            };
            let up = vm::start(&dir, &img, &opts)?;
            eprintln!(
                "lab: booted{} to multi-user in {:.1} s (agent answered after {:.1} s)",
                if firmware {
                    " through the firmware (OVMF, systemd-boot)"
                } else {
                    ""
                },
                up.multi_user_after,
                up.answered_after
            );
            println!("{}", up.line());
        }
        Cmd::Exec { cmd } => {
            let st = vm::load(&dir)?;
            let stdin: Option<Box<dyn std::io::Read + Send>> = if std::io::stdin().is_terminal() {
                None
            } else {
                Some(Box::new(std::io::stdin()))
            };
            let code = kup_lab::client::exec(
                st.agent_port,
                &st.token,
                &cmd.join(" "),
                stdin,
                &mut std::io::stdout(),
                &mut std::io::stderr(),
            )?;
            return Ok(ExitCode::from(code.clamp(0, 255) as u8));
        }
        Cmd::Wait { timeout, crash_ok } => {
            let up = vm::wait(&dir, Duration::from_secs(timeout), crash_ok)?;
            eprintln!(
                "lab: new boot answered after {:.1} s (uptime {:.1} s), multi-user after {:.1} s",
                up.answered_after, up.welcome.uptime_s, up.multi_user_after
            );
            println!("{}", up.line());
        }
        Cmd::Console => {
            if !dir.join("console.log").exists() {
                anyhow::bail!(
                    "no guest console in {}; start a guest with `lab start`",
                    dir.display()
                );
            }
            print!("{}", vm::read_console(&dir));
        }
        Cmd::Stop => {
            if vm::stop(&dir)? {
                eprintln!("lab: guest stopped");
            } else {
                eprintln!("lab: no guest was running");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
