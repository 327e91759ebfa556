//! kup-restore: a shim over `kup::restore`. Installed as /usr/lib/kup/kup-restore and linked as
//! the systemd generator `kup-generator` (it then acts on its name, as generators are called).

use std::path::Path;

use anyhow::{Context, Result, bail};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let name = Path::new(args.first().map(String::as_str).unwrap_or_default())
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    if name == "kup-generator" {
        // systemd calls generators with three directories: normal, early, late.
        let early = args
            .get(2)
            .context("kup-generator: systemd passes three output directories")?;
        kup::restore::generate(Path::new(early)).context("kup-generator")?;
        return Ok(());
    }
    let to_journal = matches!(
        args.get(1).map(String::as_str),
        Some("exec" | "finish" | "lazy" | "watchdog" | "luo-hold" | "luo-claim")
    ) && kup::logging::init("kup-restore") == kup::logging::LogTarget::Journal;
    // Fault tests: failpoints named on this kernel's command line (`kup.failpoints=`).
    #[cfg(feature = "failpoints")]
    match kup::failpoints::arm_from_cmdline() {
        Ok(armed) if !armed.is_empty() => eprintln!("kup: failpoints armed: {}", armed.join(", ")),
        Ok(_) => {}
        Err(e) => eprintln!("kup: failpoints not armed: {e}"),
    }
    match args.get(1).map(String::as_str) {
        Some("exec") => {
            let unit = args.get(2).context("usage: kup-restore exec UNIT")?;
            let r = kup::restore::exec(unit).with_context(|| format!("restoring {unit}"))?;
            println!("kup: {unit} restored as PID {} {}", r.pid, r.steps);
        }
        Some("holder") => kup::restore::spawn_holder().context("starting the restore holder")?,
        Some("hold") => kup::restore::hold(),
        Some("lazy") => {
            let unit = args.get(2).context("usage: kup-restore lazy UNIT")?;
            // stdout was the pipe to `exec`, gone by now: the journal gets the result on stderr.
            eprintln!(
                "kup: {}",
                kup::restore::serve_lazy(unit)
                    .with_context(|| format!("serving {unit}'s memory"))?
            );
        }
        Some("netlock") => {
            let n = kup::restore::netlock().context("locking the kept TCP connections")?;
            println!("kup: {n} established TCP connection(s) held until their units are restored");
        }
        Some("watchdog") => {
            let msg = kup::watchdog::feed_until_stopped(
                std::time::Duration::from_secs(120),
                std::time::Duration::from_secs(5),
            )
            .context("feeding the hardware watchdog")?;
            println!("kup: {msg}");
        }
        Some("finish") => {
            let finished = kup::restore::finish();
            // Decided, whichever way: the watchdog has done its part on this boot.
            kup::restore::release_watchdog();
            let msg = finished.context("finishing the handoff")?;
            // In the journal already, with its structured fields.
            if !to_journal {
                println!("kup: {msg}");
            }
        }
        Some("luo-hold") => {
            let dir = args
                .get(2)
                .context("usage: kup-restore luo-hold DIR [--in-place]")?;
            let argv0 = args.first().map(String::as_str).unwrap_or_default();
            let in_place = args.get(3).is_some_and(|a| a == "--in-place");
            kup::luo_store::run_holder(Path::new(dir), argv0, in_place)
                .with_context(|| format!("keeping {dir} in RAM across the kexec (LUO)"))?;
        }
        Some("luo-claim") => {
            let msg =
                kup::luo_store::claim().context("taking the checkpoints kept in RAM (LUO) back")?;
            println!("kup: {msg}");
        }
        Some("luo-claim-early") => {
            let root = args
                .get(2)
                .context("usage: kup-restore luo-claim-early ROOT")?;
            let argv0 = args.first().map(String::as_str).unwrap_or_default();
            let msg = kup::luo_store::claim_early(Path::new(root), argv0)
                .context("taking the checkpoints kept in RAM (LUO) back in the initramfs")?;
            println!("kup: {msg}");
        }
        Some("generator") => {
            let early = args
                .get(3)
                .context("usage: kup-restore generator NORMAL EARLY LATE")?;
            kup::restore::generate(Path::new(early))?;
        }
        _ => bail!(
            "usage: kup-restore exec UNIT | holder | lazy UNIT | netlock | watchdog | finish | luo-hold DIR [--in-place] | luo-claim | luo-claim-early ROOT | generator NORMAL EARLY LATE"
        ),
    }
    Ok(())
}
