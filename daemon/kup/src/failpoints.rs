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

/// Cuts the largest `pages-*.img` of a checkpoint one page short, as a failing disk would leave it.
pub fn truncate_pages(images: &Path) {
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
