//! CRIU, the checkpoint/restore engine: the command lines kup runs and the facts it reads from /proc to
//! build them (stdio that lives outside a sandboxed unit, the PIDs of a process tree).
//!
//! kup runs CRIU inside the unit's own mount and UTS namespaces (`nsenter`), so CRIU treats the
//! sandbox's mounts as its own and never dumps the namespace; at restore, systemd has built a fresh
//! sandbox for the unit and CRIU restores into it (see docs/ARCHITECTURE.md, "restore").

use std::path::Path;
use std::process::Command;

use crate::manifest::InheritFd;

/// Why CRIU could not do its part.
#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    #[error("cannot run {program}: {source}; install criu (>= 4.2) and util-linux")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("criu {action} of {what} failed; CRIU's log {log} ends with:\n{tail}")]
    Failed {
        action: &'static str,
        what: String,
        log: String,
        tail: String,
    },
    #[error("cannot read /proc/{pid}: {source} (did the process exit?)")]
    Proc { pid: i32, source: std::io::Error },
}

/// How a process's stdin/stdout/stderr are told to CRIU: resources outside the dumped namespace
/// (`--external`) and the restoring process's own descriptors that replace them (`--inherit-fd`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stdio {
    pub external: Vec<String>,
    pub inherit: Vec<InheritFd>,
}

/// The `mnt_id:` field of a `/proc/PID/fdinfo/N` text.
pub fn parse_mnt_id(fdinfo: &str) -> Option<u64> {
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("mnt_id:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The inode of a `socket:[N]` descriptor link.
pub fn parse_socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// What one stdio descriptor is, as read from /proc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StdioFd {
    /// A socket (a unit's journald stream): its inode.
    Socket(u64),
    /// A file opened outside the unit's namespace (`/dev/null`): mount id and inode.
    File { mnt_id: u64, inode: u64 },
}

/// Builds the CRIU arguments for descriptors 0..=2. A resource shared by several descriptors (stdout
/// and stderr on one journald stream) is declared once and inherited from its lowest descriptor.
pub fn stdio_args(fds: &[(i32, StdioFd)]) -> Stdio {
    let mut out = Stdio::default();
    for (fd, what) in fds {
        let (external, key) = match what {
            StdioFd::Socket(ino) => (format!("unix[{ino}]"), format!("socket:[{ino}]")),
            StdioFd::File { mnt_id, inode } => {
                let id = format!("file[{mnt_id:x}:{inode:x}]");
                (id.clone(), id)
            }
        };
        if out.inherit.iter().any(|i| i.key == key) {
            continue;
        }
        out.external.push(external);
        out.inherit.push(InheritFd { fd: *fd, key });
    }
    out
}

/// Reads descriptors 0..=2 of `pid`.
pub fn read_stdio(pid: i32) -> Result<Stdio, CriuError> {
    use std::os::unix::fs::MetadataExt;
    let proc_err = |source| CriuError::Proc { pid, source };
    let mut fds = Vec::new();
    for fd in 0..=2 {
        let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).map_err(proc_err)?;
        let link = link.to_string_lossy();
        let what = match parse_socket_inode(&link) {
            Some(ino) => StdioFd::Socket(ino),
            None => {
                let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))
                    .map_err(proc_err)?;
                let inode = std::fs::metadata(format!("/proc/{pid}/fd/{fd}"))
                    .map_err(proc_err)?
                    .ino();
                StdioFd::File {
                    mnt_id: parse_mnt_id(&info).unwrap_or(0),
                    inode,
                }
            }
        };
        fds.push((fd, what));
    }
    Ok(stdio_args(&fds))
}

/// Every PID and TID of the process tree rooted at `pid` (what must be free again at restore).
pub fn tree_pids(pid: i32) -> Result<Vec<i32>, CriuError> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let tasks = std::fs::read_dir(format!("/proc/{p}/task"))
            .map_err(|source| CriuError::Proc { pid: p, source })?;
        for t in tasks.flatten() {
            let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            out.push(tid);
            if let Ok(children) = std::fs::read_to_string(t.path().join("children")) {
                todo.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<i32>().ok()),
                );
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// `criu dump` arguments for the tree at `pid` (run inside its namespaces).
pub fn dump_args(pid: i32, images: &Path, stdio: &Stdio) -> Vec<String> {
    let mut a = vec![
        "dump".into(),
        "-t".into(),
        pid.to_string(),
        "-D".into(),
        images.display().to_string(),
        "-o".into(),
        "dump.log".into(),
        "-v4".into(),
        "--tcp-established".into(),
        // A client connecting right now (not accepted yet) is reset and retries, as at any restart.
        "--skip-in-flight".into(),
        "--file-locks".into(),
    ];
    for e in &stdio.external {
        a.push("--external".into());
        a.push(e.clone());
    }
    a
}

/// The file, in the image directory, where `criu restore` writes the restored root PID.
pub const RESTORED_PIDFILE: &str = "restored.pid";

/// `criu restore` arguments (run inside the holder's namespaces, in the unit's cgroup).
pub fn restore_args(images: &Path, inherit: &[InheritFd]) -> Vec<String> {
    let mut a = vec![
        "restore".into(),
        "-d".into(),
        "-D".into(),
        images.display().to_string(),
        "-o".into(),
        "restore.log".into(),
        "-v4".into(),
        "--tcp-established".into(),
        "--file-locks".into(),
        "--manage-cgroups=ignore".into(),
        "--pidfile".into(),
        RESTORED_PIDFILE.into(),
    ];
    for i in inherit {
        a.push("--inherit-fd".into());
        a.push(format!("fd[{}]:{}", i.fd, i.key));
    }
    a
}

/// Where CRIU is installed.
pub const CRIU: &str = "/usr/sbin/criu";

/// Runs criu with `args` inside the mount and UTS namespaces of `ns_pid`, with `images` as its
/// image directory.
///
/// CRIU's binary and the image directory are opened here, outside the unit's namespace, and reached
/// inside it as `/proc/self/fd/N`: a sandbox with `NoExecPaths=` cannot exec /usr/sbin/criu, and one
/// with `ProtectSystem=strict` sees /var/lib/kup read-only. Log and pid files are relative to the
/// image directory.
pub fn run_in_namespaces(
    ns_pid: i32,
    args: &[String],
    images: &Path,
    what: &str,
) -> Result<(), CriuError> {
    use std::os::fd::AsRawFd;
    let action = if args.first().map(String::as_str) == Some("dump") {
        "dump"
    } else {
        "restore"
    };
    let open = |p: &Path| {
        std::fs::File::open(p).map_err(|source| CriuError::Spawn {
            program: p.display().to_string(),
            source,
        })
    };
    let criu = open(Path::new(CRIU))?;
    let dir = open(images)?;
    for f in [&criu, &dir] {
        nix::fcntl::fcntl(
            f,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )
        .map_err(|e| CriuError::Spawn {
            program: "fcntl".into(),
            source: e.into(),
        })?;
    }
    let mut args = args.to_vec();
    if let Some(d) = args.iter().position(|a| a == "-D") {
        args[d + 1] = format!("/proc/self/fd/{}", dir.as_raw_fd());
    }
    let status = Command::new("nsenter")
        .args([
            "-t",
            &ns_pid.to_string(),
            "-m",
            "-u",
            "--",
            &format!("/proc/self/fd/{}", criu.as_raw_fd()),
        ])
        .args(&args)
        .status()
        .map_err(|source| CriuError::Spawn {
            program: "nsenter".into(),
            source,
        })?;
    drop((criu, dir));
    if status.success() {
        return Ok(());
    }
    let log = images.join(format!("{action}.log"));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    // CRIU probes for tun support and logs its absence as an error: not the reason for a failure.
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Error") && !l.contains("Unable to create tun"))
        .collect();
    let tail = if errors.is_empty() {
        text.lines().rev().take(5).collect::<Vec<_>>().join("\n")
    } else {
        errors.join("\n")
    };
    Err(CriuError::Failed {
        action,
        what: what.to_owned(),
        log: log.display().to_string(),
        tail,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fdinfo_and_socket_links() {
        assert_eq!(
            parse_mnt_id("pos:\t0\nflags:\t0100000\nmnt_id:\t35\nino:\t4\n"),
            Some(35)
        );
        assert_eq!(parse_mnt_id("pos: 0\n"), None);
        assert_eq!(parse_socket_inode("socket:[3581]"), Some(3581));
        assert_eq!(parse_socket_inode("/dev/null"), None);
        assert_eq!(parse_socket_inode("socket:[x]"), None);
    }

    #[test]
    fn journald_stream_shared_by_stdout_and_stderr_is_declared_once() {
        let s = stdio_args(&[
            (
                0,
                StdioFd::File {
                    mnt_id: 35,
                    inode: 4,
                },
            ),
            (1, StdioFd::Socket(3581)),
            (2, StdioFd::Socket(3581)),
        ]);
        assert_eq!(s.external, ["file[23:4]", "unix[3581]"]);
        assert_eq!(
            s.inherit,
            [
                InheritFd {
                    fd: 0,
                    key: "file[23:4]".into()
                },
                InheritFd {
                    fd: 1,
                    key: "socket:[3581]".into()
                }
            ]
        );
    }

    #[test]
    fn command_lines_carry_externals_and_inherited_fds() {
        let s = stdio_args(&[(1, StdioFd::Socket(7))]);
        let d = dump_args(42, Path::new("/img"), &s);
        assert_eq!(&d[..5], ["dump", "-t", "42", "-D", "/img"]);
        assert!(d.windows(2).any(|w| w == ["--external", "unix[7]"]));
        let r = restore_args(Path::new("/img"), &s.inherit);
        assert!(
            r.windows(2)
                .any(|w| w == ["--inherit-fd", "fd[1]:socket:[7]"])
        );
        assert!(r.contains(&"--manage-cgroups=ignore".to_owned()));
    }

    #[test]
    fn tree_of_this_process_lists_its_threads() {
        let me = std::process::id() as i32;
        let pids = tree_pids(me).unwrap();
        assert!(pids.contains(&me));
    }
}
