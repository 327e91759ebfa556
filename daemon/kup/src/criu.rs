//! CRIU, the checkpoint/restore engine: the command lines kup runs and the facts it reads from /proc to
//! build them (stdio that lives outside a sandboxed unit, the PIDs of a process tree).
//!
//! kup runs CRIU inside the unit's own mount and UTS namespaces (`nsenter`), so CRIU treats the
//! sandbox's mounts as its own and never dumps the namespace; at restore, systemd has built a fresh
//! sandbox for the unit and CRIU restores into it (see docs/ARCHITECTURE.md, "restore").

use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::Command;

use rust_criu::rust_criu_protobuf::rpc;

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
    #[error(
        "criu {action} of {what} died before answering ({status}); its log {log} ends with:\n{tail}"
    )]
    Died {
        action: &'static str,
        what: String,
        status: String,
        log: String,
        tail: String,
    },
    #[error(
        "the checkpoint of {what} failed in kup's page server, which writes its memory into FOAM ({reason}); CRIU: {criu}"
    )]
    PageServer {
        what: String,
        reason: String,
        criu: String,
    },
    #[error("cannot read /proc/{pid}: {source} (did the process exit?)")]
    Proc { pid: i32, source: std::io::Error },
    #[error(
        "the checkpoint of {what} was refused after the dump ({reason}); CRIU resumed it, it keeps running"
    )]
    PostDump { what: String, reason: String },
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

/// What kup asks CRIU to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Copy the memory while the tree keeps running (soft-dirty tracking starts or continues).
    PreDump,
    Dump,
    /// A whole dump with the tree left running afterwards (`--leave-running`): the dry-run's trial.
    TrialDump,
    Restore,
    /// Restore with the memory left out: kup's lazy-pages server serves it
    /// ([`crate::lazy_pages`]).
    LazyRestore,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::PreDump => "pre-dump",
            Action::Dump => "dump",
            Action::TrialDump => "dry-run",
            Action::Restore | Action::LazyRestore => "restore",
        }
    }
}

/// The RPC request (CRIU's rpc.proto) for `action`; `images_dir_fd` is the image directory as CRIU
/// will see it; `parent` is the previous pre-dump's directory, relative to the image directory;
/// `page_server_fd`, a socket of kup's page server CRIU inherits (dumps into FOAM).
pub fn request(
    action: Action,
    pid: i32,
    images_dir_fd: i32,
    stdio: &Stdio,
    parent: Option<&str>,
    page_server_fd: Option<i32>,
) -> rpc::Criu_req {
    let mut o = rpc::Criu_opts::new();
    // The pages go to kup's page server (FOAM, `crate::page_server`) on this inherited socket
    // instead of CRIU's pages images.
    if let Some(fd) = page_server_fd {
        let mut ps = rpc::Criu_page_server_info::new();
        ps.set_fd(fd);
        o.ps = protobuf::MessageField::some(ps);
    }
    o.set_images_dir_fd(images_dir_fd);
    o.set_log_file(format!("{}.log", action.name()));
    o.set_log_level(4);
    o.set_tcp_established(true);
    // Established connections are locked with nftables (the `nft` ruleset), never iptables.
    o.set_network_lock(rpc::Criu_network_lock_method::NFTABLES);
    o.set_file_locks(true);
    let mut req = rpc::Criu_req::new();
    if let Some(p) = parent {
        o.set_parent_img(p.to_owned());
    }
    match action {
        Action::PreDump => {
            o.set_pid(pid);
            o.set_track_mem(true);
            req.set_type(rpc::Criu_req_type::PRE_DUMP);
        }
        Action::Dump => {
            o.set_track_mem(parent.is_some());
            o.set_pid(pid);
            // A client connecting right now (not accepted yet) is reset and retries, as at any restart.
            o.set_tcp_skip_in_flight(true);
            // CRIU reports its steps; at "post-dump" the tree is frozen and dumped, not yet gone.
            o.set_notify_scripts(true);
            o.external = stdio.external.clone();
            req.set_type(rpc::Criu_req_type::DUMP);
        }
        Action::TrialDump => {
            o.set_pid(pid);
            o.set_leave_running(true);
            o.set_tcp_skip_in_flight(true);
            o.external = stdio.external.clone();
            req.set_type(rpc::Criu_req_type::DUMP);
        }
        Action::Restore | Action::LazyRestore => {
            o.set_lazy_pages(action == Action::LazyRestore);
            // The restoring process is already in the unit's cgroup; its children stay there.
            o.set_manage_cgroups_mode(rpc::Criu_cg_mode::IGNORE);
            o.inherit_fd = stdio
                .inherit
                .iter()
                .map(|i| {
                    let mut f = rpc::Inherit_fd::new();
                    f.set_fd(i.fd);
                    f.set_key(i.key.clone());
                    f
                })
                .collect();
            req.set_type(rpc::Criu_req_type::RESTORE);
        }
    }
    req.opts = protobuf::MessageField::some(o);
    req
}

/// Where CRIU is installed.
pub const CRIU: &str = "/usr/sbin/criu";

/// Copies the memory of the tree at `pid` into `images` while it keeps running (only what changed
/// since `parent`, when given), or to the page server on `page_server` (FOAM).
pub fn pre_dump(
    pid: i32,
    images: &Path,
    parent: Option<&str>,
    what: &str,
    page_server: Option<OwnedFd>,
) -> Result<(), CriuError> {
    Call {
        ns_pid: pid,
        action: Action::PreDump,
        pid,
        images,
        stdio: &Stdio::default(),
        parent,
        what,
        page_server,
    }
    .run(&mut |_| true)
    .map(|_| ())
}

/// Dumps the tree at `pid` into `images` (only the pages changed since `parent`, when given),
/// running CRIU inside the tree's mount and UTS namespaces; the pages go to the page server on
/// `page_server` when given (FOAM). The tree is gone afterwards;
/// `post_dump` runs while it is dumped but still there, frozen: when it refuses (e.g. the images
/// fail their check), the dump fails and CRIU resumes the tree, which keeps running.
pub fn dump(
    pid: i32,
    images: &Path,
    stdio: &Stdio,
    parent: Option<&str>,
    what: &str,
    page_server: Option<OwnedFd>,
    post_dump: &mut dyn FnMut() -> Result<(), String>,
) -> Result<(), CriuError> {
    let mut refused = None;
    let mut on_notify = |step: &str| {
        if step != "post-dump" {
            return true;
        }
        match post_dump() {
            Ok(()) => true,
            Err(reason) => {
                refused = Some(reason);
                false
            }
        }
    };
    let done = Call {
        ns_pid: pid,
        action: Action::Dump,
        pid,
        images,
        stdio,
        parent,
        what,
        page_server,
    }
    .run(&mut on_notify)
    .map(|_| ());
    match (done, refused) {
        (Err(_), Some(reason)) => Err(CriuError::PostDump {
            what: what.to_owned(),
            reason,
        }),
        (done, _) => done,
    }
}

/// A trial dump of the tree at `pid` into `images` that leaves it running (the dry-run): CRIU
/// freezes the tree for the time of the dump, then lets it go on.
pub fn trial_dump(pid: i32, images: &Path, stdio: &Stdio, what: &str) -> Result<(), CriuError> {
    Call {
        ns_pid: pid,
        action: Action::TrialDump,
        pid,
        images,
        stdio,
        parent: None,
        what,
        page_server: None,
    }
    .run(&mut |_| true)
    .map(|_| ())
}

/// Restores the images inside the mount and UTS namespaces of `ns_pid`, handing CRIU the
/// descriptors of `inherit` (this process's own); returns the restored root PID. With `lazy`, the
/// memory is left to the lazy-pages server ([`crate::lazy_pages`]) already listening in `images`.
pub fn restore(
    ns_pid: i32,
    images: &Path,
    inherit: &[InheritFd],
    lazy: bool,
    what: &str,
) -> Result<i32, CriuError> {
    let stdio = Stdio {
        external: Vec::new(),
        inherit: inherit.to_vec(),
    };
    let action = if lazy {
        Action::LazyRestore
    } else {
        Action::Restore
    };
    let resp = Call {
        ns_pid,
        action,
        pid: 0,
        images,
        stdio: &stdio,
        parent: None,
        what,
        page_server: None,
    }
    .run(&mut |_| true)?;
    Ok(resp.restore.pid())
}

/// Where CRIU (as root) caches its probe of the running kernel's features; gone at every boot.
pub const KDAT_CACHE: &str = "/run/criu.kdat";

/// Starts CRIU's probe of this kernel's features in the background (`criu check`, which writes
/// [`KDAT_CACHE`] first thing) unless the cache is there already. Every later CRIU of this boot
/// then skips the probe (over a second under emulation): worth starting while a restore still
/// waits for something else. The caller kills the returned child once it stops being useful.
pub fn warm_probe() -> Option<std::process::Child> {
    if Path::new(KDAT_CACHE).exists() {
        return None;
    }
    Command::new(CRIU)
        .arg("check")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()
}

/// Runs one RPC with `criu swrk` started inside the mount and UTS namespaces of `ns_pid`; CRIU's
/// step notifications go to `on_notify` (by step name) before they are acknowledged (with its
/// answer: `false` makes CRIU fail the action).
///
/// CRIU's binary and the image directory are opened here, outside the unit's namespace: a sandbox with
/// `NoExecPaths=` cannot exec /usr/sbin/criu, and one with `ProtectSystem=strict` sees /var/lib/kup
/// read-only. CRIU execs the binary as an inherited descriptor and opens the directory through
/// `/proc/<this process>/fd/N` (the RPC client's descriptor); it writes its log there.
struct Call<'a> {
    /// Whose mount and UTS namespaces CRIU runs in.
    ns_pid: i32,
    action: Action,
    /// The tree's root (dump, pre-dump); 0 for a restore.
    pid: i32,
    images: &'a Path,
    stdio: &'a Stdio,
    parent: Option<&'a str>,
    /// The unit, for messages.
    what: &'a str,
    /// kup's page-server socket CRIU sends the pages to (FOAM); closed here once CRIU has it.
    page_server: Option<OwnedFd>,
}

impl Call<'_> {
    fn run(self, on_notify: &mut dyn FnMut(&str) -> bool) -> Result<rpc::Criu_resp, CriuError> {
        let Call {
            ns_pid,
            action,
            pid,
            images,
            stdio,
            parent,
            what,
            page_server,
        } = self;
        use nix::sys::socket::{
            AddressFamily, MsgFlags, SockFlag, SockType, recv, send, socketpair,
        };
        use protobuf::Message;
        use std::os::fd::AsRawFd;

        let sys = |program: &str| {
            let program = program.to_owned();
            move |e: nix::Error| CriuError::Spawn {
                program,
                source: e.into(),
            }
        };
        let open = |p: &Path| {
            std::fs::File::open(p).map_err(|source| CriuError::Spawn {
                program: p.display().to_string(),
                source,
            })
        };
        let criu = open(Path::new(CRIU))?;
        let dir = open(images)?;
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(sys("socketpair"))?;
        // These three must survive the exec into nsenter and then criu.
        let inherit = || nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty());
        nix::fcntl::fcntl(&criu, inherit()).map_err(sys("fcntl"))?;
        nix::fcntl::fcntl(&dir, inherit()).map_err(sys("fcntl"))?;
        nix::fcntl::fcntl(&theirs, inherit()).map_err(sys("fcntl"))?;
        if let Some(ps) = &page_server {
            nix::fcntl::fcntl(ps, inherit()).map_err(sys("fcntl"))?;
        }
        let ps_fd = page_server.as_ref().map(AsRawFd::as_raw_fd);
        let dir_fd = dir.as_raw_fd();
        let mut child = Command::new("nsenter")
            .args([
                "-t",
                &ns_pid.to_string(),
                "-m",
                "-u",
                "--",
                &format!("/proc/self/fd/{}", criu.as_raw_fd()),
            ])
            .args(["swrk", &theirs.as_raw_fd().to_string()])
            .stdin(std::process::Stdio::inherit())
            .spawn()
            .map_err(|source| CriuError::Spawn {
                program: "nsenter".into(),
                source,
            })?;
        // CRIU opens the image directory as /proc/<our pid>/fd/<dir_fd>: `dir` stays open until it answers.
        // The page server sees the end of the stream once CRIU, its only other holder, is gone.
        drop((criu, theirs, page_server));
        // Fault tests: CRIU killed in the middle of its work (see `failpoints::criu_kill`).
        #[cfg(feature = "failpoints")]
        let kill_at = crate::failpoints::criu_kill(action.name(), pid, child.id());

        let fail = |reason: String| {
            let log = images.join(format!("{}.log", action.name()));
            CriuError::Failed {
                action: action.name(),
                what: what.to_owned(),
                log: log.display().to_string(),
                tail: format!("{reason}\n{}", log_errors(&log)),
            }
        };
        let req = request(action, pid, dir_fd, stdio, parent, ps_fd);
        let bytes = req
            .write_to_bytes()
            .map_err(|e| fail(format!("encoding the request: {e}")))?;
        send(ours.as_raw_fd(), &bytes, MsgFlags::empty()).map_err(sys("send to criu"))?;
        let mut buf = vec![0u8; 1 << 16];
        let resp = loop {
            let n = recv(ours.as_raw_fd(), &mut buf, MsgFlags::empty())
                .map_err(sys("recv from criu"))?;
            if n == 0 {
                let status = child
                    .wait()
                    .map(|st| st.to_string())
                    .unwrap_or_else(|e| format!("not waitable: {e}"));
                let log = images.join(format!("{}.log", action.name()));
                return Err(CriuError::Died {
                    action: action.name(),
                    what: what.to_owned(),
                    status,
                    log: log.display().to_string(),
                    tail: log_errors(&log),
                });
            }
            let resp = rpc::Criu_resp::parse_from_bytes(&buf[..n])
                .map_err(|e| fail(format!("unreadable answer: {e}")))?;
            if resp.type_() == rpc::Criu_req_type::NOTIFY {
                #[cfg(feature = "failpoints")]
                if crate::failpoints::criu_kill_now(
                    &kill_at,
                    resp.notify.script(),
                    child.id(),
                    false,
                ) {
                    continue;
                }
                let ok = on_notify(resp.notify.script());
                #[cfg(feature = "failpoints")]
                if crate::failpoints::criu_kill_now(
                    &kill_at,
                    resp.notify.script(),
                    child.id(),
                    true,
                ) {
                    continue;
                }
                let mut ack = rpc::Criu_req::new();
                ack.set_type(rpc::Criu_req_type::NOTIFY);
                ack.set_notify_success(ok);
                let bytes = ack
                    .write_to_bytes()
                    .map_err(|e| fail(format!("encoding the notify answer: {e}")))?;
                send(ours.as_raw_fd(), &bytes, MsgFlags::empty()).map_err(sys("send to criu"))?;
                continue;
            }
            break resp;
        };
        drop((ours, dir));
        let _ = child.wait();
        if !resp.success() {
            let errno = resp.cr_errno();
            return Err(fail(format!(
                "CRIU says: {} (errno {errno})",
                resp.cr_errmsg()
            )));
        }
        Ok(resp)
    }
}

/// The error lines of a CRIU log (its probe for tun support is not a reason for a failure).
fn log_errors(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Error") && !l.contains("Unable to create tun"))
        .collect();
    if errors.is_empty() {
        text.lines().rev().take(5).collect::<Vec<_>>().join("\n")
    } else {
        errors.join("\n")
    }
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
    fn rpc_requests_carry_externals_and_inherited_fds() {
        let s = stdio_args(&[
            (
                0,
                StdioFd::File {
                    mnt_id: 35,
                    inode: 4,
                },
            ),
            (1, StdioFd::Socket(7)),
        ]);
        let d = request(Action::Dump, 42, 9, &s, None, None);
        assert_eq!(d.type_(), rpc::Criu_req_type::DUMP);
        assert_eq!(d.opts.pid(), 42);
        assert_eq!(d.opts.images_dir_fd(), 9);
        assert_eq!(d.opts.external, ["file[23:4]", "unix[7]"]);
        assert!(d.opts.tcp_established() && d.opts.tcp_skip_in_flight());
        assert_eq!(d.opts.log_file(), "dump.log");
        assert!(d.opts.notify_scripts());
        assert_eq!(
            d.opts.network_lock(),
            rpc::Criu_network_lock_method::NFTABLES
        );
        let r = request(Action::Restore, 0, 9, &s, None, None);
        assert_eq!(r.type_(), rpc::Criu_req_type::RESTORE);
        assert!(!r.opts.lazy_pages());
        assert!(
            request(Action::LazyRestore, 0, 9, &s, None, None)
                .opts
                .lazy_pages()
        );
        let inherit: Vec<(i32, &str)> = r
            .opts
            .inherit_fd
            .iter()
            .map(|f| (f.fd(), f.key()))
            .collect();
        assert_eq!(inherit, [(0, "file[23:4]"), (1, "socket:[7]")]);
        assert_eq!(r.opts.manage_cgroups_mode(), rpc::Criu_cg_mode::IGNORE);
        assert!(r.opts.external.is_empty());
    }

    #[test]
    fn pre_copy_chains_each_round_to_the_previous_one() {
        let p = request(
            Action::PreDump,
            42,
            9,
            &Stdio::default(),
            Some("pre-1"),
            None,
        );
        assert_eq!(p.type_(), rpc::Criu_req_type::PRE_DUMP);
        assert!(p.opts.track_mem());
        assert_eq!(p.opts.parent_img(), "pre-1");
        assert_eq!(p.opts.log_file(), "pre-dump.log");
        let d = request(Action::Dump, 42, 9, &Stdio::default(), Some("pre-2"), None);
        assert!(d.opts.track_mem());
        assert_eq!(d.opts.parent_img(), "pre-2");
        assert!(
            !request(Action::Dump, 42, 9, &Stdio::default(), None, None)
                .opts
                .track_mem()
        );
        // Into FOAM: the pages go to kup's page server on an inherited socket.
        assert!(d.opts.ps.is_none());
        let f = request(
            Action::Dump,
            42,
            9,
            &Stdio::default(),
            Some("pre-2"),
            Some(11),
        );
        assert_eq!(f.opts.ps.fd(), 11);
        assert_eq!(f.opts.parent_img(), "pre-2");
    }

    #[test]
    fn tree_of_this_process_lists_its_threads() {
        let me = std::process::id() as i32;
        let pids = tree_pids(me).unwrap();
        assert!(pids.contains(&me));
    }
}
