//! The Live Update Orchestrator (`/dev/liveupdate`, Linux >= 6.19 built with CONFIG_LIVEUPDATE): the
//! ioctl binding, and the luo backend's two halves: keeping a checkpoint's image tree in RAM across
//! the kexec (each file an unlinked tmpfs file preserved in a LUO session, no copy) and taking it
//! back on the new kernel (the files reopened through `/proc/PID/fd/N` links in the same tree shape).
//!
//! The tree's shape (which token is which file, its size, the symlinks between pre-copy rounds)
//! travels beside the manifest in `luo.json` ([`Index`]); the memory travels in the kernel.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The character device LUO exposes when the kernel was booted with `liveupdate=on` (and `kho=on`).
pub const DEVICE: &str = "/dev/liveupdate";
/// Kernel arguments a kernel built with kup's kernel-patches/luo.config needs to keep memory.
pub const CMDLINE_ARGS: [&str; 2] = ["kho=on", "liveupdate=on"];
/// `CONFIG_*` lines of `/boot/config-VER` the luo backend needs on both kernels.
pub const KERNEL_CONFIG: [&str; 4] = [
    "CONFIG_KEXEC_FILE",
    "CONFIG_KEXEC_HANDOVER",
    "CONFIG_LIVEUPDATE",
    "CONFIG_LIVEUPDATE_MEMFD",
];
/// LUO session names are at most 63 bytes (plus the NUL).
const NAME_LEN: usize = 64;

/// Why LUO cannot be used, or what failed in it.
#[derive(Debug, thiserror::Error)]
pub enum LuoError {
    #[error(
        "{DEVICE} is missing: the running kernel has no Live Update Orchestrator, or was booted without `kho=on liveupdate=on`; boot a kernel built with kup's kernel-patches (luo.config) with those arguments, or set backend = \"disk\""
    )]
    NoDevice,
    #[error(
        "kernel {version} lacks {missing} in /boot/config-{version}; install a kernel built with kup's kernel-patches/luo.config, or set backend = \"disk\""
    )]
    KernelConfig { version: String, missing: String },
    #[error("LUO session name {0:?} is longer than 63 bytes")]
    Name(String),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error(
        "the preserved file {path} came back with {got} bytes, the checkpoint wrote {want}; its images cannot be trusted"
    )]
    Size { path: String, got: u64, want: u64 },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> LuoError {
    let what = what.into();
    move |source| LuoError::Io { what, source }
}

/// Which `KERNEL_CONFIG` symbols a kernel config (the text of `/boot/config-VER`) lacks (`=y` only:
/// LUO cannot be a module).
pub fn missing_config(config: &str) -> Vec<&'static str> {
    KERNEL_CONFIG
        .iter()
        .copied()
        .filter(|sym| {
            !config
                .lines()
                .any(|l| l.trim().strip_prefix(sym) == Some("=y"))
        })
        .collect()
}

/// Checks that kernel `version` (its `/boot/config-VERSION`) carries LUO.
pub fn kernel_supports(boot: &Path, version: &str) -> Result<(), LuoError> {
    let path = boot.join(format!("config-{version}"));
    let config = std::fs::read_to_string(&path).map_err(io_err(format!(
        "reading {} (the kernel's build config, to see whether it has LUO)",
        path.display()
    )))?;
    let missing = missing_config(&config);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(LuoError::KernelConfig {
            version: version.to_owned(),
            missing: missing.join(", "),
        })
    }
}

/// Checks that the running kernel offers LUO now.
pub fn running_supports() -> Result<(), LuoError> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata(DEVICE) {
        Ok(m) if m.file_type().is_char_device() => Ok(()),
        _ => Err(LuoError::NoDevice),
    }
}

/// Where a kernel with kup's PPP patch says it keeps a preserved process's memory in place.
pub const IN_PLACE_PARAM: &str = "/sys/module/memfd_luo/parameters/ppp";

/// Whether the running kernel keeps a process's memory in place when its pidfd is preserved
/// (kup's PPP patch, `kernel-patches/`); the reason when not.
pub fn running_keeps_in_place() -> Result<(), String> {
    match std::fs::read_to_string(IN_PLACE_PARAM) {
        Ok(v) if v.trim() == "Y" => Ok(()),
        Ok(_) => Err(format!(
            "the running kernel has kup's PPP patch turned off ({IN_PLACE_PARAM} is not Y; memfd_luo.ppp=0 on its command line?)"
        )),
        Err(_) => Err(format!(
            "the running kernel cannot keep a process's memory in place ({IN_PLACE_PARAM} is missing: it lacks kup's PPP patch, kernel-patches/)"
        )),
    }
}

/// The shape of a preserved image tree: every regular file with its session token and size, and
/// the symlinks (pre-copy `parent` links) as they were. Paths are relative to the tree's root.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Index {
    /// The LUO session that holds the files.
    pub session: String,
    pub files: Vec<IndexFile>,
    /// Symlink path -> its target, as read.
    pub links: BTreeMap<String, String>,
    /// Processes whose memory the kernel keeps in place (PPP): each comes back as a memfd whose
    /// offset is the address, laid out at its `path` (the process's FOAM [`crate::foam::WHOLE`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<IndexProcess>,
}

/// A process whose memory is kept in place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexProcess {
    pub token: u64,
    pub path: String,
    pub pid: i32,
}

/// The first token of processes kept in place (files are numbered from 1).
pub const PROCESS_TOKENS: u64 = 1 << 32;

/// One preserved file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexFile {
    pub token: u64,
    pub path: String,
    pub size: u64,
}

impl Index {
    /// Parses `luo.json`.
    pub fn parse(text: &str) -> Result<Index, String> {
        let index: Index = serde_json::from_str(text).map_err(|e| e.to_string())?;
        index.validate()?;
        Ok(index)
    }

    /// Tokens unique, paths relative and inside the tree (no `..`), no path twice.
    pub fn validate(&self) -> Result<(), String> {
        let mut tokens = std::collections::BTreeSet::new();
        let mut paths = std::collections::BTreeSet::new();
        let all = self
            .files
            .iter()
            .map(|f| f.path.as_str())
            .chain(self.processes.iter().map(|p| p.path.as_str()))
            .chain(self.links.keys().map(String::as_str));
        for p in all {
            let path = Path::new(p);
            if p.is_empty()
                || path.is_absolute()
                || path
                    .components()
                    .any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                return Err(format!("path {p:?} is not inside the image tree"));
            }
            if !paths.insert(p) {
                return Err(format!("path {p:?} is listed twice"));
            }
        }
        for t in self
            .files
            .iter()
            .map(|f| f.token)
            .chain(self.processes.iter().map(|p| p.token))
        {
            if !tokens.insert(t) {
                return Err(format!("token {t} is used twice"));
            }
        }
        Ok(())
    }

    /// Every token of the session: the files', then the kept processes'.
    pub fn tokens(&self) -> impl Iterator<Item = u64> + '_ {
        self.files
            .iter()
            .map(|f| f.token)
            .chain(self.processes.iter().map(|p| p.token))
    }

    /// The top-level directories (one per unit) and the tokens of the files under each.
    pub fn tokens_by_unit(&self) -> BTreeMap<String, Vec<u64>> {
        let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        let all = self
            .files
            .iter()
            .map(|f| (&f.path, f.token))
            .chain(self.processes.iter().map(|p| (&p.path, p.token)));
        for (path, token) in all {
            let top = path.split('/').next().unwrap_or_default().to_owned();
            out.entry(top).or_default().push(token);
        }
        out
    }
}

/// The ioctls (include/uapi/linux/liveupdate.h; `_IO(0xBA, nr)`, the size in each struct's first
/// field).
#[allow(unsafe_code)]
mod sys {
    use std::os::fd::RawFd;

    #[repr(C)]
    pub struct Session {
        pub size: u32,
        pub fd: i32,
        pub name: [u8; super::NAME_LEN],
    }

    #[repr(C)]
    pub struct FdArg {
        pub size: u32,
        pub fd: i32,
        pub token: u64,
    }

    #[repr(C)]
    pub struct Finish {
        pub size: u32,
        pub reserved: u32,
    }

    // The kernel reads these structs and writes their `fd` back: read-write, whatever `_IO` says.
    nix::ioctl_readwrite_bad!(create_session, nix::request_code_none!(0xBA, 0x00), Session);
    nix::ioctl_readwrite_bad!(
        retrieve_session,
        nix::request_code_none!(0xBA, 0x01),
        Session
    );
    nix::ioctl_readwrite_bad!(preserve_fd, nix::request_code_none!(0xBA, 0x40), FdArg);
    nix::ioctl_readwrite_bad!(retrieve_fd, nix::request_code_none!(0xBA, 0x41), FdArg);
    nix::ioctl_write_ptr_bad!(finish, nix::request_code_none!(0xBA, 0x42), Finish);

    /// CREATE_SESSION (`create`) or RETRIEVE_SESSION on `/dev/liveupdate`; the session's fd.
    pub fn session(dev: RawFd, name: [u8; super::NAME_LEN], create: bool) -> nix::Result<RawFd> {
        let mut arg = Session {
            size: size_of::<Session>() as u32,
            fd: -1,
            name,
        };
        // SAFETY: `arg` is a live, correctly sized liveupdate_ioctl_*_session the kernel reads and
        // fills (its `fd`) for the duration of the call.
        unsafe {
            if create {
                create_session(dev, &mut arg)?;
            } else {
                retrieve_session(dev, &mut arg)?;
            }
        }
        Ok(arg.fd)
    }

    /// PRESERVE_FD (`fd` in) or RETRIEVE_FD (`fd` out) on a session.
    pub fn fd(session: RawFd, fd: RawFd, token: u64, preserve: bool) -> nix::Result<RawFd> {
        let mut arg = FdArg {
            size: size_of::<FdArg>() as u32,
            fd,
            token,
        };
        // SAFETY: `arg` is a live, correctly sized liveupdate_session_*_fd for the call.
        unsafe {
            if preserve {
                preserve_fd(session, &mut arg)?;
            } else {
                retrieve_fd(session, &mut arg)?;
            }
        }
        Ok(arg.fd)
    }

    /// SESSION_FINISH.
    pub fn finish_session(session: RawFd) -> nix::Result<()> {
        let arg = Finish {
            size: size_of::<Finish>() as u32,
            reserved: 0,
        };
        // SAFETY: `arg` is a live, correctly sized liveupdate_session_finish for the call.
        unsafe { finish(session, &arg) }.map(|_| ())
    }

    /// Takes ownership of a descriptor the kernel just handed out.
    pub fn own(fd: RawFd) -> std::os::fd::OwnedFd {
        use std::os::fd::FromRawFd;
        // SAFETY: `fd` was returned by the kernel to this process and nothing else owns it.
        unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
    }
}

fn name_bytes(name: &str) -> Result<[u8; NAME_LEN], LuoError> {
    let mut out = [0u8; NAME_LEN];
    if name.len() >= NAME_LEN || name.as_bytes().contains(&0) {
        return Err(LuoError::Name(name.to_owned()));
    }
    out[..name.len()].copy_from_slice(name.as_bytes());
    Ok(out)
}

fn open_device() -> Result<File, LuoError> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(DEVICE)
    {
        Ok(f) => Ok(f),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(LuoError::NoDevice),
        Err(e) => Err(LuoError::Io {
            what: format!(
                "opening {DEVICE} (one opener at a time: is another kup-restore or a systemd >= 261 holding it?)"
            ),
            source: e,
        }),
    }
}

/// A live LUO session and the files preserved or retrieved through it. Dropping it closes the
/// session: before a kexec that unpreserves everything, after a retrieve it finishes the session.
#[derive(Debug)]
pub struct Session {
    pub name: String,
    fd: OwnedFd,
    /// token -> the file (an unlinked tmpfs file or memfd).
    pub files: BTreeMap<u64, OwnedFd>,
}

impl Session {
    /// Creates session `name` (outgoing kernel).
    pub fn create(name: &str) -> Result<Session, LuoError> {
        let dev = open_device()?;
        let fd = sys::session(dev.as_raw_fd(), name_bytes(name)?, true)
            .map_err(|e| io_err(format!("creating LUO session {name}"))(e.into()))?;
        Ok(Session {
            name: name.to_owned(),
            fd: sys::own(fd),
            files: BTreeMap::new(),
        })
    }

    /// Takes session `name` back (incoming kernel).
    pub fn retrieve(name: &str) -> Result<Session, LuoError> {
        let dev = open_device()?;
        let fd = sys::session(dev.as_raw_fd(), name_bytes(name)?, false).map_err(|e| {
            io_err(format!(
                "retrieving LUO session {name} (ENOENT: the old kernel did not preserve it, or this boot is not the kexec it was made for)"
            ))(e.into())
        })?;
        Ok(Session {
            name: name.to_owned(),
            fd: sys::own(fd),
            files: BTreeMap::new(),
        })
    }

    /// Preserves `file` (a memfd, or an unlinked tmpfs file) under `token`; keeps it open, also
    /// when the kernel refuses it (so [`Session::give_back`] can still write it back).
    pub fn preserve(&mut self, file: OwnedFd, token: u64, what: &str) -> Result<(), LuoError> {
        let raw = file.as_raw_fd();
        self.files.insert(token, file);
        sys::fd(self.fd.as_raw_fd(), raw, token, true).map_err(|e| {
            io_err(format!("preserving {what} in LUO session {}", self.name))(e.into())
        })?;
        Ok(())
    }

    /// Retrieves the file preserved under `token`.
    pub fn take(&mut self, token: u64) -> Result<(), LuoError> {
        let fd = sys::fd(self.fd.as_raw_fd(), -1, token, false).map_err(|e| {
            io_err(format!(
                "retrieving token {token} of LUO session {}",
                self.name
            ))(e.into())
        })?;
        self.files.insert(token, sys::own(fd));
        Ok(())
    }

    /// The descriptor numbers of the session and of each file it holds, in this process (for
    /// another process to take them over with [`Session::adopt`]).
    pub fn descriptors(&self) -> (RawFd, Vec<(u64, RawFd)>) {
        (
            self.fd.as_raw_fd(),
            self.files
                .iter()
                .map(|(t, f)| (*t, f.as_raw_fd()))
                .collect(),
        )
    }

    /// Takes over session `name` from the live process `pid`, where it is descriptor `fd` and
    /// holds `files` (token, descriptor) (`pidfd_getfd`: the same open files, duplicated into
    /// this process; the other process may go).
    pub fn adopt(
        name: &str,
        pid: i32,
        fd: RawFd,
        files: &[(u64, RawFd)],
    ) -> Result<Session, LuoError> {
        use rustix::process::{Pid, PidfdFlags, PidfdGetfdFlags, pidfd_getfd, pidfd_open};
        let what =
            |n: RawFd| format!("taking descriptor {n} of LUO session {name} from process {pid}");
        let pidfd = Pid::from_raw(pid)
            .ok_or_else(|| {
                io_err(format!("process {pid} of LUO session {name}"))(
                    io::ErrorKind::InvalidInput.into(),
                )
            })
            .and_then(|p| {
                pidfd_open(p, PidfdFlags::empty()).map_err(|e| {
                    io_err(format!("process {pid}, which holds LUO session {name}"))(e.into())
                })
            })?;
        let take = |n: RawFd| {
            pidfd_getfd(&pidfd, n, PidfdGetfdFlags::empty()).map_err(|e| io_err(what(n))(e.into()))
        };
        let mut session = Session {
            name: name.to_owned(),
            fd: take(fd)?,
            files: BTreeMap::new(),
        };
        for &(token, n) in files {
            session.files.insert(token, take(n)?);
        }
        Ok(session)
    }

    /// Finishes a retrieved session: the kernel drops its records (the files stay while open).
    pub fn finish(self) -> Result<(), LuoError> {
        sys::finish_session(self.fd.as_raw_fd())
            .map_err(|e| io_err(format!("finishing LUO session {}", self.name))(e.into()))
    }
}

/// Lists the tree under `root`: regular files (sorted, tokens from 1) and symlinks. Directories are
/// implied by the paths.
pub fn scan(root: &Path, session: &str) -> Result<Index, LuoError> {
    let mut index = Index {
        session: session.to_owned(),
        ..Index::default()
    };
    let mut stack = vec![PathBuf::new()];
    let mut files = Vec::new();
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let entries =
            std::fs::read_dir(&dir).map_err(io_err(format!("listing {}", dir.display())))?;
        for e in entries {
            let e = e.map_err(io_err(format!("listing {}", dir.display())))?;
            let path = rel.join(e.file_name());
            let ty = e
                .file_type()
                .map_err(io_err(format!("reading {}", e.path().display())))?;
            let shown = path.to_string_lossy().into_owned();
            if ty.is_dir() {
                stack.push(path);
            } else if ty.is_symlink() {
                let target = std::fs::read_link(e.path())
                    .map_err(io_err(format!("reading the link {}", e.path().display())))?;
                index
                    .links
                    .insert(shown, target.to_string_lossy().into_owned());
            } else if ty.is_file() {
                let size = e
                    .metadata()
                    .map_err(io_err(format!("reading {}", e.path().display())))?
                    .len();
                files.push((shown, size));
            }
        }
    }
    files.sort();
    index.files = files
        .into_iter()
        .enumerate()
        .map(|(i, (path, size))| IndexFile {
            token: i as u64 + 1,
            path,
            size,
        })
        .collect();
    Ok(index)
}

/// Outgoing kernel: preserves every file of `index` (under `root`, on a tmpfs) in `session`, which
/// may hold processes kept in place already. Each file is opened, unlinked (LUO keeps only
/// unlinked shmem files) and preserved; its memory is not copied. On failure the files preserved
/// so far are written back ([`Session::give_back`]).
pub fn preserve_files(session: &mut Session, root: &Path, index: &Index) -> Result<(), LuoError> {
    for f in &index.files {
        let path = root.join(&f.path);
        let result = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err(format!("opening {}", path.display())))
            .and_then(|file| {
                std::fs::remove_file(&path)
                    .map_err(io_err(format!("unlinking {}", path.display())))?;
                session.preserve(file.into(), f.token, &path.display().to_string())
            });
        if let Err(e) = result {
            let _ = session.give_back(root, index);
            return Err(e);
        }
    }
    Ok(())
}

impl Session {
    /// Writes every file this session holds back into the tree under `root` (an update that did
    /// not switch after all: the rollback restores from the files).
    pub fn give_back(&self, root: &Path, index: &Index) -> Result<(), LuoError> {
        for f in &index.files {
            let Some(fd) = self.files.get(&f.token) else {
                continue;
            };
            let path = root.join(&f.path);
            let mut src = File::from(fd.try_clone().map_err(io_err("duplicating a descriptor"))?);
            use std::io::Seek;
            src.seek(io::SeekFrom::Start(0))
                .map_err(io_err(format!("rewinding {}", path.display())))?;
            let mut dst =
                File::create(&path).map_err(io_err(format!("writing {} back", path.display())))?;
            io::copy(&mut src, &mut dst)
                .map_err(io_err(format!("writing {} back", path.display())))?;
        }
        Ok(())
    }
}

/// Incoming kernel: retrieves every file and process of `index` from its session (see
/// [`lay_out`] for the rest).
pub fn take_tree(index: &Index) -> Result<Session, LuoError> {
    let mut session = Session::retrieve(&index.session)?;
    for token in index.tokens() {
        session.take(token)?;
    }
    Ok(session)
}

/// Incoming kernel: checks each file `session` holds against the size in `index`, and lays the
/// tree out under `root`: a symlink to `/proc/HOLDER/fd/N` per file and kept process (the caller,
/// `holder`, keeps the session and its files open), the recorded symlinks as they were.
pub fn lay_out(root: &Path, index: &Index, session: &Session, holder: u32) -> Result<(), LuoError> {
    let fd_of = |token: u64, path: &str| {
        session.files.get(&token).ok_or_else(|| LuoError::Io {
            what: format!(
                "LUO session {} holds no token {token} for {path}",
                session.name
            ),
            source: io::ErrorKind::NotFound.into(),
        })
    };
    for f in &index.files {
        let fd = fd_of(f.token, &f.path)?;
        let got = File::from(fd.try_clone().map_err(io_err("duplicating a descriptor"))?)
            .metadata()
            .map_err(io_err(format!("reading the size of {}", f.path)))?
            .len();
        if got != f.size {
            return Err(LuoError::Size {
                path: f.path.clone(),
                got,
                want: f.size,
            });
        }
        link(
            root,
            &f.path,
            &format!("/proc/{holder}/fd/{}", fd.as_raw_fd()),
        )?;
    }
    for p in &index.processes {
        let fd = fd_of(p.token, &p.path)?;
        link(
            root,
            &p.path,
            &format!("/proc/{holder}/fd/{}", fd.as_raw_fd()),
        )?;
    }
    for (path, target) in &index.links {
        link(root, path, target)?;
    }
    Ok(())
}

/// Incoming kernel: [`take_tree`], then [`lay_out`].
pub fn retrieve_tree(root: &Path, index: &Index, holder: u32) -> Result<Session, LuoError> {
    let session = take_tree(index)?;
    lay_out(root, index, &session, holder)?;
    Ok(session)
}

fn link(root: &Path, rel: &str, target: &str) -> Result<(), LuoError> {
    let path = root.join(rel);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    }
    let _ = std::fs::remove_file(&path);
    std::os::unix::fs::symlink(target, &path)
        .map_err(io_err(format!("linking {} to {target}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_config_needs_every_luo_symbol_built_in() {
        let full = "CONFIG_KEXEC_FILE=y\nCONFIG_KEXEC_HANDOVER=y\nCONFIG_LIVEUPDATE=y\nCONFIG_LIVEUPDATE_MEMFD=y\n";
        assert!(missing_config(full).is_empty());
        let debian = "CONFIG_KEXEC_FILE=y\n# CONFIG_KEXEC_HANDOVER is not set\n";
        assert_eq!(
            missing_config(debian),
            [
                "CONFIG_KEXEC_HANDOVER",
                "CONFIG_LIVEUPDATE",
                "CONFIG_LIVEUPDATE_MEMFD"
            ]
        );
        // A prefix of another symbol does not count.
        let prefix = full.replace("CONFIG_LIVEUPDATE=y\n", "CONFIG_LIVEUPDATE_X=y\n");
        assert_eq!(missing_config(&prefix), ["CONFIG_LIVEUPDATE"]);
    }

    #[test]
    fn ioctl_structs_have_the_kernel_layout() {
        assert_eq!(size_of::<sys::Session>(), 72);
        assert_eq!(size_of::<sys::FdArg>(), 16);
        assert_eq!(size_of::<sys::Finish>(), 8);
        assert_eq!(nix::request_code_none!(0xBA, 0x41), 0xBA41);
    }

    #[test]
    fn session_names_fit_the_kernel_field() {
        assert!(name_bytes("kup-1764-abcd").is_ok());
        assert!(name_bytes(&"x".repeat(63)).is_ok());
        assert!(name_bytes(&"x".repeat(64)).is_err());
        assert!(name_bytes("a\0b").is_err());
    }

    #[test]
    fn an_adopted_session_holds_the_same_files_and_lays_them_out() {
        use std::io::{Read, Write};
        // As the early claim leaves it: a process (here this one) holding the session and its
        // files; any open file stands in for the session's descriptor.
        let dir = tempfile::tempdir().unwrap();
        let mut pages = tempfile::tempfile().unwrap();
        pages.write_all(&[5u8; 4096]).unwrap();
        let session_fd = tempfile::tempfile().unwrap();
        let (pid, fd) = (std::process::id() as i32, session_fd.as_raw_fd());
        let s = Session::adopt("kup-x", pid, fd, &[(1, pages.as_raw_fd())]).unwrap();
        assert_eq!(s.name, "kup-x");
        assert_ne!(
            s.files[&1].as_raw_fd(),
            pages.as_raw_fd(),
            "a duplicate of its own"
        );
        let index = Index {
            session: "kup-x".into(),
            files: vec![IndexFile {
                token: 1,
                path: "a.service/pages-1.img".into(),
                size: 4096,
            }],
            links: [("a.service/parent".to_owned(), "pre-1".to_owned())].into(),
            processes: Vec::new(),
        };
        lay_out(dir.path(), &index, &s, std::process::id()).unwrap();
        let mut got = Vec::new();
        File::open(dir.path().join("a.service/pages-1.img"))
            .unwrap()
            .read_to_end(&mut got)
            .unwrap();
        assert_eq!(got, vec![5u8; 4096], "the laid-out file is the adopted one");
        assert_eq!(
            std::fs::read_link(dir.path().join("a.service/parent")).unwrap(),
            Path::new("pre-1")
        );
        // A size the index does not expect, a token the session lacks, a process that is gone:
        // each says what.
        let mut wrong = index.clone();
        wrong.files[0].size = 8192;
        let err = lay_out(dir.path(), &wrong, &s, std::process::id()).unwrap_err();
        assert!(
            matches!(
                err,
                LuoError::Size {
                    want: 8192,
                    got: 4096,
                    ..
                }
            ),
            "{err}"
        );
        wrong.files[0] = IndexFile {
            token: 2,
            path: "a.service/pages-2.img".into(),
            size: 1,
        };
        let err = lay_out(dir.path(), &wrong, &s, std::process::id())
            .unwrap_err()
            .to_string();
        assert!(err.contains("holds no token 2"), "{err}");
        let err = Session::adopt("kup-x", i32::MAX, fd, &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("process {}", i32::MAX)), "{err}");
    }

    #[test]
    fn scan_lists_files_with_tokens_and_keeps_links() {
        let dir = tempfile::tempdir().unwrap();
        let unit = dir.path().join("memcached.service");
        std::fs::create_dir_all(unit.join("pre-1")).unwrap();
        std::fs::write(unit.join("pages-1.img"), vec![7u8; 8192]).unwrap();
        std::fs::write(unit.join("pre-1/pages-1.img"), vec![1u8; 4096]).unwrap();
        std::os::unix::fs::symlink("pre-1", unit.join("parent")).unwrap();
        let index = scan(dir.path(), "kup-x").unwrap();
        assert_eq!(index.session, "kup-x");
        assert_eq!(
            index.files,
            [
                IndexFile {
                    token: 1,
                    path: "memcached.service/pages-1.img".into(),
                    size: 8192
                },
                IndexFile {
                    token: 2,
                    path: "memcached.service/pre-1/pages-1.img".into(),
                    size: 4096
                },
            ]
        );
        assert_eq!(index.links["memcached.service/parent"], "pre-1");
        assert_eq!(
            index.tokens_by_unit()["memcached.service"],
            vec![1u64, 2u64]
        );
        let text = serde_json::to_string(&index).unwrap();
        assert_eq!(Index::parse(&text).unwrap(), index);
    }

    #[test]
    fn an_index_that_escapes_its_tree_or_repeats_is_refused() {
        let file = |token, path: &str| IndexFile {
            token,
            path: path.into(),
            size: 1,
        };
        let mut index = Index {
            session: "s".into(),
            files: vec![file(1, "u/a"), file(2, "u/b")],
            links: BTreeMap::new(),
            processes: Vec::new(),
        };
        assert!(index.validate().is_ok());
        index.files[1].path = "../etc/passwd".into();
        assert!(index.validate().unwrap_err().contains("not inside"));
        index.files[1].path = "/etc/passwd".into();
        assert!(index.validate().unwrap_err().contains("not inside"));
        index.files[1].path = "u/a".into();
        assert!(index.validate().unwrap_err().contains("twice"));
        index.files[1].path = "u/b".into();
        index.files[1].token = 1;
        assert!(index.validate().unwrap_err().contains("token 1"));
    }

    /// The real thing where the machine has LUO (a kup kernel booted with `kho=on liveupdate=on`;
    /// the lab's luo test runs there): a tmpfs file, unlinked, preserved, read back through the
    /// session. Skips elsewhere.
    #[test]
    fn preserve_and_give_back_on_a_kernel_with_luo() {
        if running_supports().is_err() {
            eprintln!("skipped: no {DEVICE}");
            return;
        }
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        std::fs::create_dir(dir.path().join("u")).unwrap();
        std::fs::write(dir.path().join("u/pages-1.img"), vec![9u8; 12288]).unwrap();
        let index = scan(dir.path(), "kup-unit-test").unwrap();
        let mut session = Session::create(&index.session).unwrap();
        preserve_files(&mut session, dir.path(), &index).unwrap();
        assert!(!dir.path().join("u/pages-1.img").exists());
        session.give_back(dir.path(), &index).unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("u/pages-1.img")).unwrap(),
            vec![9u8; 12288]
        );
    }

    #[test]
    fn processes_kept_in_place_count_with_their_unit_and_share_no_token_or_path() {
        let mut index = Index {
            session: "kup-x".into(),
            files: vec![IndexFile {
                token: 1,
                path: "memcached.service/pagemap-7.img".into(),
                size: 10,
            }],
            links: BTreeMap::new(),
            processes: vec![IndexProcess {
                token: PROCESS_TOKENS,
                path: "memcached.service/foam/pagemap-7/whole.foam".into(),
                pid: 7,
            }],
        };
        index.validate().unwrap();
        let text = serde_json::to_string(&index).unwrap();
        assert_eq!(Index::parse(&text).unwrap(), index);
        assert_eq!(
            index.tokens_by_unit()["memcached.service"],
            vec![1, PROCESS_TOKENS]
        );
        index.processes[0].token = 1;
        assert!(index.validate().unwrap_err().contains("token 1"));
        index.processes[0].token = PROCESS_TOKENS;
        index.processes[0].path = "memcached.service/pagemap-7.img".into();
        assert!(index.validate().unwrap_err().contains("twice"));
        // An index from before (no processes) still reads.
        let old = r#"{"session": "kup-x", "files": [], "links": {}}"#;
        assert!(Index::parse(old).unwrap().processes.is_empty());
    }
}
