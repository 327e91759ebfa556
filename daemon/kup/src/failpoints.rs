//! Failpoints for the fault tests (cargo feature `failpoints`, docs/RELIABILITY.md): armed from the
//! kernel command line, `kup.failpoints=NAME=ACTION;NAME=ACTION` (actions as the `fail` crate reads
//! them: `return`, `panic`, `sleep(MS)`, ...), so a test arms them on the kernel it updates to with
//! `kupctl update --append`. Nothing here is compiled into a build without the feature.

use std::path::Path;

/// The `NAME=ACTION` pairs of `kup.failpoints=` on `cmdline` (before any `--`; the last one wins).
pub fn parse(cmdline: &str) -> Vec<(String, String)> {
    let Some(value) = cmdline
        .split_whitespace()
        .take_while(|w| *w != "--")
        .filter_map(|w| w.strip_prefix("kup.failpoints="))
        .last()
    else {
        return Vec::new();
    };
    value
        .split(';')
        .filter_map(|pair| pair.split_once('='))
        .filter(|(name, _)| !name.is_empty())
        .map(|(name, action)| (name.to_owned(), action.to_owned()))
        .collect()
}

/// Arms the failpoints `/proc/cmdline` names; returns their names.
pub fn arm_from_cmdline() -> Result<Vec<String>, String> {
    let cmdline = std::fs::read_to_string("/proc/cmdline")
        .map_err(|e| format!("cannot read /proc/cmdline: {e}"))?;
    let mut armed = Vec::new();
    for (name, action) in parse(&cmdline) {
        fail::cfg(&name, &action).map_err(|e| format!("failpoint {name}={action}: {e}"))?;
        armed.push(name);
    }
    Ok(armed)
}

/// Starts a `sleep` that gets PID `pid` when it is free (the next PID the kernel hands out is
/// `ns_last_pid` + 1).
pub fn take_pid(pid: i32) {
    let _ = std::fs::write("/proc/sys/kernel/ns_last_pid", format!("{}", pid - 1));
    let _ = std::process::Command::new("sleep")
        .arg("600")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
}

/// Failpoint `criu-kill-ACTION` (ACTION: `pre-dump`, `dump`, `dry-run`, `restore`), evaluated when
/// kup starts CRIU (pid `criu`) on the tree at `pid`. Its value says when CRIU is killed (SIGKILL):
/// `seized`: as soon as it holds the tree (the tree's TracerPid is CRIU); a step name such as
/// `post-dump`: at that notification, before kup handles it; `post-dump+tree`: once kup has handled
/// it (checked the images), with the tree killed too: CRIU dying after it killed the dumped tree,
/// before it answered. Returns the step to kill at, if any.
pub fn criu_kill(action: &str, pid: i32, criu: u32) -> Option<String> {
    let when = fail::eval(&format!("criu-kill-{action}"), |arg| {
        arg.unwrap_or_default()
    })?;
    if when != "seized" {
        return Some(when);
    }
    std::thread::spawn(move || {
        let t0 = std::time::Instant::now();
        while t0.elapsed() < std::time::Duration::from_secs(120) {
            // CRIU's service forks for a pre-dump: the tracer is `criu` or its child.
            if let Some(tracer) = status_field(pid, "TracerPid:").filter(|t| *t != 0) {
                if tracer == criu || status_field(tracer as i32, "PPid:") == Some(criu) {
                    tracing::warn!(pid, tracer, "failpoint: killing CRIU, which holds the tree");
                    kill(tracer as i32);
                    kill(criu as i32);
                    return;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    });
    None
}

/// A numeric field (`TracerPid:`, `PPid:`) of /proc/PID/status.
fn status_field(pid: i32, field: &str) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().parse().ok())
}

/// At CRIU's notification `step`, before kup handles it (`handled` false) or after: kills CRIU (and
/// the dumped tree, for `STEP+tree`, which acts after) when `kill_at` names this step; true when it
/// did (the notification is then left unanswered).
pub fn criu_kill_now(kill_at: &Option<String>, step: &str, criu: u32, handled: bool) -> bool {
    let Some(at) = kill_at else {
        return false;
    };
    let (at, tree) = match at.strip_suffix("+tree") {
        Some(at) => (at, true),
        None => (at.as_str(), false),
    };
    if at != step || tree != handled {
        return false;
    }
    if tree {
        // The tree CRIU holds: every process it traces.
        for pid in traced_by(criu) {
            tracing::warn!(pid, "failpoint: killing the dumped tree");
            kill(pid);
        }
    }
    tracing::warn!(criu, step, "failpoint: killing CRIU at its notification");
    kill(criu as i32);
    true
}

fn kill(pid: i32) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
}

/// The processes whose TracerPid is `tracer`.
fn traced_by(tracer: u32) -> Vec<i32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| status_field(*pid, "TracerPid:") == Some(tracer))
        .collect()
}

/// Damages a checkpoint as a failing disk would: the last page of the largest process's memory in
/// FOAM is lost (punched out), or, without FOAM, the largest `pages-*.img` is cut one page short.
pub fn truncate_pages(images: &Path) {
    if lose_foam_page(images) {
        return;
    }
    let largest = std::fs::read_dir(images).ok().and_then(|es| {
        es.flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("pages-"))
            .filter_map(|e| Some((e.metadata().ok()?.len(), e.path())))
            .max()
    });
    if let Some((len, path)) = largest {
        if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&path) {
            let _ = f.set_len(len.saturating_sub(4096));
        }
    }
}

/// Punches out the last stored page of the FOAM pagemap holding the most data; false without FOAM.
fn lose_foam_page(images: &Path) -> bool {
    use crate::foam;
    let Ok(dirs) = std::fs::read_dir(images.join(foam::DIR)) else {
        return false;
    };
    let largest = dirs
        .flatten()
        .filter_map(|d| {
            let ranges = foam::data_ranges(&d.path()).ok()?;
            let bytes: u64 = ranges.iter().map(|(a, b)| b - a).sum();
            Some((bytes, d.path(), ranges.last().copied()?))
        })
        .max();
    let Some((_, dir, (_, end))) = largest else {
        return false;
    };
    let (slice, offset) = foam::place(end - 4096);
    let path = dir.join(foam::slice_name(slice));
    let Ok(f) = std::fs::OpenOptions::new().write(true).open(&path) else {
        return false;
    };
    use nix::fcntl::{FallocateFlags, fallocate};
    fallocate(
        &f,
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        offset as i64,
        4096,
    )
    .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_cmdline_value() {
        assert_eq!(
            parse("root=/dev/vda kup.failpoints=restore-exec=return;x=sleep(5) quiet"),
            [
                ("restore-exec".to_owned(), "return".to_owned()),
                ("x".to_owned(), "sleep(5)".to_owned())
            ]
        );
        assert!(parse("root=/dev/vda -- kup.failpoints=a=return").is_empty());
        assert_eq!(
            parse("kup.failpoints=a=panic kup.failpoints=b=return"),
            [("b".to_owned(), "return".to_owned())]
        );
        assert!(parse("kup.failpoints=junk").is_empty());
    }
}
