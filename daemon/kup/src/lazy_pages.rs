//! kup's lazy-pages server: brings a lazily restored process tree's memory in from its images,
//! pre-copy parents included (CRIU's own `criu lazy-pages` stalls on pages left in parent images).
//!
//! It speaks the protocol `criu restore --lazy-pages` speaks to CRIU's daemon (criu/uffd.c): the
//! restore connects to `lazy-pages.socket` in the image directory and sends, per process, its pid
//! (a native `i32`) and then its userfaultfd (`SCM_RIGHTS`, with one dummy byte), or a negative pid
//! for a zombie; `0x52535446` ("ReSTore Finished") once the tree runs. Only pages CRIU's pagemap
//! marks `PE_LAZY` are left to the server; the restore reads the others itself. Faults are served
//! first (`UFFDIO_COPY` of the page and a short readahead, `UFFDIO_ZEROPAGE` where no lazy page
//! is), and once the restore is finished everything else is copied in the background in chunks that
//! grow while no fault comes. The process's own events keep the plan right: `REMOVE` (madvise) and
//! `UNMAP` drop ranges, `REMAP` (mremap) moves them, `FORK` gives the child a copy of the parent's.
//! [`next_message`], [`parse_event`], [`Iovs`] and [`read_plan`] are pure; [`serve`] does the I/O
//! (its tests run it against a real userfaultfd of the test process where the kernel allows one:
//! faults, REMOVE, UNMAP, REMAP and FORK).

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{IoSliceMut, Read as _, Write};
use std::os::fd::{AsFd as _, AsRawFd as _, OwnedFd, RawFd};
use std::os::unix::fs::FileExt as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{ControlMessageOwned, MsgFlags};

use crate::criu_image::{self, Extent};

/// The socket the restore connects to, in the image directory (CRIU's fixed name).
pub const SOCKET: &str = "lazy-pages.socket";
/// What the restore sends once the restored tree runs (`LAZY_PAGES_RESTORE_FINISHED`).
pub const RESTORE_FINISHED: u32 = 0x5253_5446;
const PAGE: u64 = 4096;
/// Pages copied on a fault: the faulting one and what follows it in the same range.
const READAHEAD: u64 = 16 * PAGE;
/// Background chunks start here after a fault and double up to [`CHUNK_MAX`] while none comes. A
/// service under load faults all the time: at 64 KiB the background fill of a 2.1 GiB memcached
/// crawled at ~25 MiB/s under TCG (bench, 2026-11-26); 1 MiB delays a fault by a copy of at most
/// that much.
const CHUNK_MIN: u64 = 1 << 20;
const CHUNK_MAX: u64 = 4 << 20;
/// How long the server waits for the restore to connect.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(300);

/// Why the lazy-pages server stopped before every page was in.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    #[error("cannot {op}: {source}")]
    Io { op: String, source: std::io::Error },
    #[error(transparent)]
    Images(#[from] criu_image::ImageError),
    #[error(
        "the restore did not connect to {0} within {1} s (criu restore failed before it got there? see restore.log beside it)"
    )]
    NoRestore(String, u64),
    #[error(
        "the restore closed its connection before it finished (criu restore failed? see restore.log in {0})"
    )]
    RestoreGone(String),
    #[error(
        "the restore sent {0}, which is not CRIU's lazy-pages protocol (criu and kup disagree)"
    )]
    Protocol(String),
    #[error("process {pid}: {op} at {addr:#x} failed: {errno}")]
    Uffd {
        pid: i32,
        op: &'static str,
        addr: u64,
        errno: Errno,
    },
    #[error(
        "process {pid}: lazy page {addr:#x} is in no image of the chain; the images are damaged"
    )]
    NoData { pid: i32, addr: u64 },
    #[error("process {pid}: unexpected userfaultfd event {event:#x}")]
    Event { pid: i32, event: u8 },
    #[error(
        "{source}; the restored processes {pids:?} were killed, since their memory cannot be completed (the images stay: the boot's verify falls back to them)"
    )]
    Killed {
        source: Box<LazyError>,
        pids: Vec<i32>,
    },
}

fn io_err(op: impl Into<String>) -> impl FnOnce(std::io::Error) -> LazyError {
    let op = op.into();
    move |source| LazyError::Io { op, source }
}

/// One message of the restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    /// A process and (the next received descriptor) its userfaultfd.
    Task(i32),
    /// A zombie: nothing to serve.
    Zombie(i32),
    /// The restored tree runs: background transfer may start.
    Finished,
}

/// The next message in the bytes received so far (`buf`), given how many received descriptors are
/// not claimed yet: the message and the bytes it takes, or `None` while more is needed.
pub fn next_message(buf: &[u8], fds: usize) -> Result<Option<(Message, usize)>, String> {
    let Some(word) = buf.get(..4) else {
        return Ok(None);
    };
    let mut w = [0; 4];
    w.copy_from_slice(word);
    let v = i32::from_ne_bytes(w);
    if u32::from_ne_bytes(w) == RESTORE_FINISHED {
        return Ok(Some((Message::Finished, 4)));
    }
    match v {
        0 => Err("pid 0".into()),
        v if v < 0 => Ok(Some((Message::Zombie(v.saturating_neg()), 4))),
        _ if buf.len() < 5 => Ok(None),
        v if fds == 0 => Err(format!("pid {v} without its userfaultfd")),
        v => Ok(Some((Message::Task(v), 5))),
    }
}

/// The size of a `struct uffd_msg`.
pub const MSG_SIZE: usize = 32;

/// One userfaultfd message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A thread faulted on this page (aligned).
    Fault(u64),
    /// The process forked; the child's userfaultfd was installed here as this descriptor.
    Fork(RawFd),
    /// mremap moved `len` bytes from `from` to `to`.
    Remap {
        from: u64,
        to: u64,
        len: u64,
    },
    /// madvise(DONTNEED/REMOVE) dropped the pages (the VMA stays).
    Remove {
        start: u64,
        end: u64,
    },
    /// munmap (or an mremap shrink) unmapped them.
    Unmap {
        start: u64,
        end: u64,
    },
    Other(u8),
}

/// Parses a `struct uffd_msg` (linux/userfaultfd.h): the event byte, then the argument union at
/// offset 8.
pub fn parse_event(m: &[u8; MSG_SIZE]) -> Event {
    let u64_at = |at: usize| {
        let mut b = [0; 8];
        b.copy_from_slice(&m[at..at + 8]);
        u64::from_ne_bytes(b)
    };
    let u32_at = |at: usize| {
        let mut b = [0; 4];
        b.copy_from_slice(&m[at..at + 4]);
        u32::from_ne_bytes(b)
    };
    match m[0] {
        0x12 => Event::Fault(u64_at(16) & !(PAGE - 1)),
        0x13 => Event::Fork(u32_at(8) as RawFd),
        0x14 => Event::Remap {
            from: u64_at(8),
            to: u64_at(16),
            len: u64_at(24),
        },
        0x15 => Event::Remove {
            start: u64_at(8),
            end: u64_at(16),
        },
        0x16 => Event::Unmap {
            start: u64_at(8),
            end: u64_at(16),
        },
        other => Event::Other(other),
    }
}

/// A range still to bring in: `start..end` in the running process, whose data was at `img` at dump
/// time (they differ once the process mremaps it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Iov {
    pub start: u64,
    pub end: u64,
    pub img: u64,
}

/// The ranges of one process still to bring in, non-overlapping, by start.
#[derive(Debug, Clone, Default)]
pub struct Iovs {
    map: BTreeMap<u64, (u64, u64)>,
    bytes: u64,
}

impl Iovs {
    /// `ranges` where the process runs them as they were dumped.
    pub fn new(ranges: &[(u64, u64)]) -> Self {
        let mut s = Iovs::default();
        for &(start, end) in ranges {
            s.insert(Iov {
                start,
                end,
                img: start,
            });
        }
        s
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Bytes still to bring in.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The range holding `addr`.
    pub fn containing(&self, addr: u64) -> Option<Iov> {
        self.map
            .range(..=addr)
            .next_back()
            .filter(|(_, (end, _))| addr < *end)
            .map(|(&start, &(end, img))| Iov { start, end, img })
    }

    /// The lowest range.
    pub fn first(&self) -> Option<Iov> {
        self.map
            .iter()
            .next()
            .map(|(&start, &(end, img))| Iov { start, end, img })
    }

    /// Puts a range (back) in; it must not overlap the others.
    pub fn insert(&mut self, iov: Iov) {
        if iov.start < iov.end {
            self.bytes += iov.end - iov.start;
            self.map.insert(iov.start, (iov.end, iov.img));
        }
    }

    /// Takes `start..end` out: the pieces of it that were still to bring in.
    pub fn take(&mut self, start: u64, end: u64) -> Vec<Iov> {
        let mut keys: Vec<u64> = Vec::new();
        if let Some((&s, &(e, _))) = self.map.range(..start).next_back() {
            if e > start {
                keys.push(s);
            }
        }
        keys.extend(self.map.range(start..end).map(|(&s, _)| s));
        let mut out = Vec::with_capacity(keys.len());
        for s in keys {
            let Some((e, img)) = self.map.remove(&s) else {
                continue;
            };
            self.bytes -= e - s;
            if s < start {
                self.insert(Iov {
                    start: s,
                    end: start,
                    img,
                });
            }
            if e > end {
                self.insert(Iov {
                    start: end,
                    end: e,
                    img: img + (end - s),
                });
            }
            let (a, b) = (s.max(start), e.min(end));
            out.push(Iov {
                start: a,
                end: b,
                img: img + (a - s),
            });
        }
        out
    }

    /// mremap moved `from..from+len` to `to..to+len` (whatever was there before is gone).
    pub fn remap(&mut self, from: u64, to: u64, len: u64) {
        let moved = self.take(from, from.saturating_add(len));
        self.take(to, to.saturating_add(len));
        for p in moved {
            self.insert(Iov {
                start: p.start - from + to,
                end: p.end - from + to,
                img: p.img,
            });
        }
    }
}

/// Where the data of `len` bytes at dump-time address `img` is: `(offset in the buffer, layer,
/// offset in that layer's pages file, length)` pieces, or the first address no image holds.
pub fn read_plan(
    extents: &[Extent],
    img: u64,
    len: u64,
) -> Result<Vec<(u64, usize, u64, u64)>, u64> {
    let end = img + len;
    let mut at = img;
    let mut out = Vec::new();
    let from = extents.partition_point(|x| x.end <= img);
    for x in extents[from..].iter().take_while(|x| x.start < end) {
        if x.start > at {
            return Err(at);
        }
        let b = x.end.min(end);
        let Some((layer, off)) = x.data else {
            return Err(at);
        };
        out.push((at - img, layer, off + (at - x.start), b - at));
        at = b;
    }
    if at < end {
        return Err(at);
    }
    Ok(out)
}

/// The userfaultfd ioctls (linux/userfaultfd.h) and the adoption of received descriptors.
#[allow(unsafe_code)]
mod uffd {
    use std::os::fd::{FromRawFd as _, OwnedFd, RawFd};

    use nix::errno::Errno;

    #[repr(C)]
    pub struct Range {
        start: u64,
        len: u64,
    }
    #[repr(C)]
    pub struct Copy {
        dst: u64,
        src: u64,
        len: u64,
        mode: u64,
        copy: i64,
    }
    #[repr(C)]
    pub struct Zeropage {
        range: Range,
        mode: u64,
        zeropage: i64,
    }

    nix::ioctl_read!(ioc_unregister, 0xAA, 0x01, Range);
    nix::ioctl_read!(ioc_wake, 0xAA, 0x02, Range);
    nix::ioctl_readwrite!(ioc_copy, 0xAA, 0x03, Copy);
    nix::ioctl_readwrite!(ioc_zeropage, 0xAA, 0x04, Zeropage);

    /// UFFDIO_COPY of `src` to `dst` in the process behind `fd`, waking its waiters; on failure the
    /// error and the bytes copied before it (the kernel's `copy` field, when positive).
    pub fn copy(fd: RawFd, dst: u64, src: &[u8]) -> Result<(), (Errno, u64)> {
        let mut c = Copy {
            dst,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode: 0,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads `len` bytes at `src`, a live slice of ours, and writes only into
        // the address space the userfaultfd `fd` belongs to (another process); `c` outlives the call.
        match unsafe { ioc_copy(fd, &mut c) } {
            Ok(_) => Ok(()),
            Err(e) => Err((e, u64::try_from(c.copy).unwrap_or(0))),
        }
    }

    /// UFFDIO_ZEROPAGE of `len` bytes at `start`, waking its waiters.
    pub fn zeropage(fd: RawFd, start: u64, len: u64) -> Result<(), Errno> {
        let mut z = Zeropage {
            range: Range { start, len },
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: the ioctl maps zero pages into the other process's registered range; it reads and
        // writes only `z`, which outlives the call.
        unsafe { ioc_zeropage(fd, &mut z) }.map(|_| ())
    }

    /// UFFDIO_WAKE: threads waiting on `start..start+len` retry their access.
    pub fn wake(fd: RawFd, start: u64, len: u64) -> Result<(), Errno> {
        let mut r = Range { start, len };
        // SAFETY: the ioctl only reads `r`, which outlives the call.
        unsafe { ioc_wake(fd, &mut r) }.map(|_| ())
    }

    /// UFFDIO_UNREGISTER: faults in `start..start+len` are the kernel's again (zero pages).
    pub fn unregister(fd: RawFd, start: u64, len: u64) -> Result<(), Errno> {
        let mut r = Range { start, len };
        // SAFETY: the ioctl only reads `r`, which outlives the call.
        unsafe { ioc_unregister(fd, &mut r) }.map(|_| ())
    }

    /// Takes ownership of a descriptor the kernel just installed in this process (`SCM_RIGHTS`, or
    /// a fork event's child userfaultfd).
    pub fn adopt(fd: RawFd) -> OwnedFd {
        // SAFETY: `fd` was installed for us by the kernel a moment ago and nothing else owns it.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }
}

/// One process's memory: its pages files and where each range's data is (shared with forked
/// children).
#[derive(Debug)]
struct Source {
    files: Vec<Option<File>>,
    extents: Vec<Extent>,
    /// The memory kept in place across the kexec (the luo backend's PPP, [`crate::foam::WHOLE`]):
    /// each range copied in is punched out of it, so the unit's memory is never in RAM twice.
    release: bool,
}

impl Source {
    fn read(&self, pid: i32, img: u64, buf: &mut [u8]) -> Result<(), LazyError> {
        let plan = read_plan(&self.extents, img, buf.len() as u64)
            .map_err(|addr| LazyError::NoData { pid, addr })?;
        for (at, layer, off, len) in plan {
            let file = self
                .files
                .get(layer)
                .and_then(Option::as_ref)
                .ok_or(LazyError::NoData {
                    pid,
                    addr: img + at,
                })?;
            file.read_exact_at(&mut buf[at as usize..(at + len) as usize], off)
                .map_err(io_err(format!(
                    "read the pages of process {pid} (layer {layer}, offset {off})"
                )))?;
        }
        Ok(())
    }

    /// Frees what [`Source::read`] read for `img..img + len`, once it is in the process: memory
    /// kept in place only, and only while no forked child shares this source (`shared`: the
    /// child may still need the pages).
    fn release(&self, img: u64, len: u64, shared: bool) {
        use nix::fcntl::{FallocateFlags, fallocate};
        if !self.release || shared {
            return;
        }
        let Ok(plan) = read_plan(&self.extents, img, len) else {
            return;
        };
        for (_, layer, off, len) in plan {
            if let Some(Some(file)) = self.files.get(layer) {
                // Best effort: a range not punched is freed with the images.
                let _ = fallocate(
                    file,
                    FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                    off as i64,
                    len as i64,
                );
            }
        }
    }
}

#[derive(Debug)]
struct Task {
    pid: i32,
    uffd: File,
    iovs: Iovs,
    source: Rc<Source>,
    gone: bool,
}

/// What a copy came to.
enum Copied {
    Done,
    /// The process's mappings are changing (an event to read first): the rest is back in the
    /// plan, to retry.
    Again,
}

/// What the server did.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub processes: usize,
    /// Bytes left to the server at the start.
    pub lazy_bytes: u64,
    pub faults: u64,
    pub fault_bytes: u64,
    pub background_bytes: u64,
    pub zero_pages: u64,
    /// Bytes the processes dropped or unmapped before they came in.
    pub dropped_bytes: u64,
    /// From listening to the restore's "finished".
    pub restore_took: Option<Duration>,
    /// From listening to the last page.
    pub took: Duration,
}

struct Server<'a> {
    images: &'a Path,
    log: &'a mut dyn Write,
    t0: Instant,
    tasks: Vec<Task>,
    retry: Vec<(usize, u64)>,
    buf: Vec<u8>,
    chunk: u64,
    next: usize,
    s: Summary,
}

impl Server<'_> {
    fn note(&mut self, what: std::fmt::Arguments) {
        let _ = writeln!(self.log, "({:9.3}) {what}", self.t0.elapsed().as_secs_f64());
    }

    fn add_task(&mut self, pid: i32, fd: OwnedFd) -> Result<(), LazyError> {
        let pp = criu_image::process_pages(self.images, pid)?;
        // Memory kept in place is opened for writing too: what is copied in is punched out.
        let release = pp
            .pages_files
            .iter()
            .any(|p| p.file_name().is_some_and(|n| n == crate::foam::WHOLE));
        let files = pp
            .pages_files
            .iter()
            .map(|p| {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(release)
                    .open(p)
                    .ok()
            })
            .collect();
        let iovs = Iovs::new(&pp.lazy);
        self.note(format_args!(
            "process {pid}: {} MiB lazy in {} ranges, data in {} layer(s)",
            iovs.bytes() >> 20,
            pp.lazy.len(),
            pp.pages_files.len()
        ));
        self.s.processes += 1;
        self.s.lazy_bytes += iovs.bytes();
        set_nonblocking(&fd)?;
        self.tasks.push(Task {
            pid,
            uffd: File::from(fd),
            iovs,
            source: Rc::new(Source {
                files,
                extents: pp.extents,
                release,
            }),
            gone: false,
        });
        Ok(())
    }

    fn gone(&mut self, t: usize) {
        let task = &mut self.tasks[t];
        task.gone = true;
        let left = task.iovs.bytes();
        task.iovs = Iovs::default();
        let pid = task.pid;
        self.s.dropped_bytes += left;
        self.note(format_args!(
            "process {pid} is gone ({} KiB were still to come)",
            left >> 10
        ));
    }

    /// Copies one planned range in; `fault` says whether a fault asked for it.
    fn copy(&mut self, t: usize, iov: Iov, fault: bool) -> Result<Copied, LazyError> {
        let len = iov.end - iov.start;
        let (pid, fd) = (self.tasks[t].pid, self.tasks[t].uffd.as_raw_fd());
        let buf = &mut self.buf[..len as usize];
        self.tasks[t].source.read(pid, iov.img, buf)?;
        let shared = Rc::strong_count(&self.tasks[t].source) > 1;
        let (errno, done) = match uffd::copy(fd, iov.start, buf) {
            Ok(()) => {
                self.count(fault, len);
                self.tasks[t].source.release(iov.img, len, shared);
                return Ok(Copied::Done);
            }
            Err((errno, done)) => (errno, done.min(len) & !(PAGE - 1)),
        };
        self.count(fault, done);
        let rest = |skip: u64| Iov {
            start: iov.start + done + skip,
            end: iov.end,
            img: iov.img + done + skip,
        };
        match errno {
            Errno::EAGAIN => {
                self.tasks[t].iovs.insert(rest(0));
                Ok(Copied::Again)
            }
            // A page is there already (the process's own, after a REMOVE we had not read): keep
            // it, wake whoever waits on it, go on with the rest.
            Errno::EEXIST => {
                let _ = uffd::wake(fd, iov.start + done, PAGE);
                self.tasks[t].iovs.insert(rest(PAGE));
                Ok(Copied::Again)
            }
            Errno::ESRCH | Errno::ENOSPC => {
                self.s.dropped_bytes += len - done;
                self.gone(t);
                Ok(Copied::Done)
            }
            // The range is no longer registered (its unmap came before we read the event).
            Errno::ENOENT => {
                self.s.dropped_bytes += len - done;
                Ok(Copied::Done)
            }
            errno => Err(LazyError::Uffd {
                pid,
                op: "UFFDIO_COPY",
                addr: iov.start + done,
                errno,
            }),
        }
    }

    fn count(&mut self, fault: bool, bytes: u64) {
        if fault {
            self.s.fault_bytes += bytes;
        } else {
            self.s.background_bytes += bytes;
        }
    }

    /// Serves a fault at `addr`; returns whether it must be retried.
    fn fault(&mut self, t: usize, addr: u64) -> Result<bool, LazyError> {
        if self.tasks[t].gone {
            return Ok(false);
        }
        let Some(iov) = self.tasks[t].iovs.containing(addr) else {
            // Not a lazy page (or one already in): what the kernel would have given, a zero page.
            let fd = self.tasks[t].uffd.as_raw_fd();
            return match uffd::zeropage(fd, addr, PAGE) {
                Ok(()) => {
                    self.s.zero_pages += 1;
                    Ok(false)
                }
                Err(Errno::EEXIST) => {
                    let _ = uffd::wake(fd, addr, PAGE);
                    Ok(false)
                }
                Err(Errno::EAGAIN) => Ok(true),
                Err(Errno::ESRCH | Errno::ENOSPC) => {
                    self.gone(t);
                    Ok(false)
                }
                Err(Errno::ENOENT) => Ok(false),
                Err(errno) => Err(LazyError::Uffd {
                    pid: self.tasks[t].pid,
                    op: "UFFDIO_ZEROPAGE",
                    addr,
                    errno,
                }),
            };
        };
        self.s.faults += 1;
        self.chunk = CHUNK_MIN;
        let end = iov.end.min(addr + READAHEAD);
        for piece in self.tasks[t].iovs.take(addr, end) {
            if let Copied::Again = self.copy(t, piece, true)? {
                break;
            }
        }
        Ok(!self.tasks[t].gone && self.tasks[t].iovs.containing(addr).is_some())
    }

    /// Reads and handles every pending event of process `t`.
    fn events(&mut self, t: usize) -> Result<(), LazyError> {
        let mut raw = [0u8; MSG_SIZE * 16];
        loop {
            if self.tasks[t].gone {
                return Ok(());
            }
            let n = match (&self.tasks[t].uffd).read(&mut raw) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let pid = self.tasks[t].pid;
                    return Err(io_err(format!("read the userfaultfd of process {pid}"))(e));
                }
            };
            if n == 0 {
                self.gone(t);
                return Ok(());
            }
            for m in raw[..n].chunks_exact(MSG_SIZE) {
                let mut msg = [0u8; MSG_SIZE];
                msg.copy_from_slice(m);
                self.event(t, parse_event(&msg))?;
            }
        }
    }

    fn event(&mut self, t: usize, ev: Event) -> Result<(), LazyError> {
        let pid = self.tasks[t].pid;
        match ev {
            Event::Fault(addr) => {
                if self.fault(t, addr)? {
                    self.retry.push((t, addr));
                }
            }
            Event::Fork(fd) => {
                let fd = uffd::adopt(fd);
                set_nonblocking(&fd)?;
                let child = Task {
                    pid,
                    uffd: File::from(fd),
                    iovs: self.tasks[t].iovs.clone(),
                    source: Rc::clone(&self.tasks[t].source),
                    gone: false,
                };
                self.note(format_args!(
                    "process {pid} forked: its child gets the {} KiB still to come",
                    child.iovs.bytes() >> 10
                ));
                self.tasks.push(child);
            }
            Event::Remap { from, to, len } => self.tasks[t].iovs.remap(from, to, len),
            Event::Remove { start, end } => {
                // The VMA stays: faults there must be the kernel's (fresh zero pages), not ours.
                match uffd::unregister(self.tasks[t].uffd.as_raw_fd(), start, end - start) {
                    Ok(()) => {}
                    Err(Errno::ENOMEM | Errno::ESRCH) => {
                        self.gone(t);
                        return Ok(());
                    }
                    Err(errno) => {
                        return Err(LazyError::Uffd {
                            pid,
                            op: "UFFDIO_UNREGISTER",
                            addr: start,
                            errno,
                        });
                    }
                }
                self.drop_range(t, start, end);
            }
            Event::Unmap { start, end } => self.drop_range(t, start, end),
            Event::Other(event) => return Err(LazyError::Event { pid, event }),
        }
        Ok(())
    }

    fn drop_range(&mut self, t: usize, start: u64, end: u64) {
        let dropped: u64 = self.tasks[t]
            .iovs
            .take(start, end)
            .iter()
            .map(|i| i.end - i.start)
            .sum();
        self.s.dropped_bytes += dropped;
    }

    /// Copies the next background chunk of the next process that has one (round robin).
    fn background(&mut self) -> Result<(), LazyError> {
        let n = self.tasks.len();
        for k in 0..n {
            let t = (self.next + k) % n;
            let Some(first) = self.tasks[t].iovs.first() else {
                continue;
            };
            self.next = t + 1;
            let end = first.end.min(first.start + self.chunk);
            for piece in self.tasks[t].iovs.take(first.start, end) {
                if let Copied::Again = self.copy(t, piece, false)? {
                    break;
                }
            }
            self.chunk = (self.chunk * 2).min(CHUNK_MAX);
            return Ok(());
        }
        Ok(())
    }

    /// Serves the restore on `conn` until every page is in.
    fn run(&mut self, conn: &UnixStream) -> Result<(), LazyError> {
        let (mut rx, mut fds) = (Vec::new(), VecDeque::new());
        let (mut open, mut finished) = (true, false);
        loop {
            if open {
                open = receive(conn, &mut rx, &mut fds)?;
                while let Some((m, used)) =
                    next_message(&rx, fds.len()).map_err(LazyError::Protocol)?
                {
                    rx.drain(..used);
                    match m {
                        Message::Task(pid) => {
                            let fd = fds.pop_front().ok_or_else(|| {
                                LazyError::Protocol(format!("pid {pid} without fd"))
                            })?;
                            self.add_task(pid, fd)?;
                        }
                        Message::Zombie(pid) => self.note(format_args!("process {pid}: a zombie")),
                        Message::Finished => {
                            finished = true;
                            self.s.restore_took = Some(self.t0.elapsed());
                            self.note(format_args!("the restore finished: background transfer"));
                        }
                    }
                }
                if !open && !finished {
                    return Err(LazyError::RestoreGone(self.images.display().to_string()));
                }
            }
            for t in 0..self.tasks.len() {
                self.events(t)?;
            }
            for (t, addr) in std::mem::take(&mut self.retry) {
                if self.fault(t, addr)? {
                    self.retry.push((t, addr));
                }
            }
            let work = finished && self.tasks.iter().any(|t| !t.iovs.is_empty());
            if finished && !work && self.retry.is_empty() {
                break;
            }
            if work {
                self.background()?;
            }
            let timeout = if work || !self.retry.is_empty() {
                PollTimeout::ZERO
            } else {
                PollTimeout::from(1000u16)
            };
            let mut p: Vec<PollFd> = self
                .tasks
                .iter()
                .filter(|t| !t.gone)
                .map(|t| PollFd::new(t.uffd.as_fd(), PollFlags::POLLIN))
                .collect();
            if open {
                p.push(PollFd::new(conn.as_fd(), PollFlags::POLLIN));
            }
            match nix::poll::poll(&mut p, timeout) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(io_err("poll the userfaultfds")(e.into())),
            }
        }
        Ok(())
    }
}

fn set_nonblocking(fd: &OwnedFd) -> Result<(), LazyError> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags =
        fcntl(fd, FcntlArg::F_GETFL).map_err(|e| io_err("read a userfaultfd's flags")(e.into()))?;
    fcntl(
        fd,
        FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
    )
    .map_err(|e| io_err("make a userfaultfd non-blocking")(e.into()))?;
    Ok(())
}

/// Receives what the restore sent: data bytes into `rx`, descriptors into `fds`. Returns false once
/// the restore has closed its end.
fn receive(
    conn: &UnixStream,
    rx: &mut Vec<u8>,
    fds: &mut VecDeque<OwnedFd>,
) -> Result<bool, LazyError> {
    loop {
        let mut data = [0u8; 256];
        let mut cmsg = nix::cmsg_space!([RawFd; 16]);
        let mut iov = [IoSliceMut::new(&mut data)];
        let got = nix::sys::socket::recvmsg::<()>(
            conn.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
        );
        let (n, truncated) = match got {
            Ok(msg) => {
                if let Ok(cmsgs) = msg.cmsgs() {
                    for c in cmsgs {
                        if let ControlMessageOwned::ScmRights(received) = c {
                            fds.extend(received.into_iter().map(uffd::adopt));
                        }
                    }
                }
                (msg.bytes, msg.flags.contains(MsgFlags::MSG_CTRUNC))
            }
            Err(Errno::EAGAIN) => return Ok(true),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(io_err("receive from the restore")(e.into())),
        };
        if truncated {
            return Err(LazyError::Protocol(
                "more descriptors than fit one message".into(),
            ));
        }
        if n == 0 {
            return Ok(false);
        }
        rx.extend_from_slice(&data[..n]);
    }
}

/// Waits for the restore on `images/lazy-pages.socket` (`ready` is called once it listens), then
/// serves every lazy page of the restored tree until all are in (or dropped by the processes);
/// notes what it does in `log`.
pub fn serve(
    images: &Path,
    ready: impl FnOnce(),
    log: &mut dyn Write,
) -> Result<Summary, LazyError> {
    let sock = images.join(SOCKET);
    let _ = std::fs::remove_file(&sock);
    let listener =
        UnixListener::bind(&sock).map_err(io_err(format!("listen on {}", sock.display())))?;
    listener
        .set_nonblocking(true)
        .map_err(io_err("make the socket non-blocking"))?;
    ready();
    let t0 = Instant::now();
    let conn = loop {
        match listener.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(io_err(format!("accept on {}", sock.display()))(e)),
        }
        if t0.elapsed() > ACCEPT_TIMEOUT {
            let _ = std::fs::remove_file(&sock);
            return Err(LazyError::NoRestore(
                sock.display().to_string(),
                ACCEPT_TIMEOUT.as_secs(),
            ));
        }
        let mut p = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        let _ = nix::poll::poll(&mut p, PollTimeout::from(1000u16));
    };
    drop(listener);
    let _ = std::fs::remove_file(&sock);
    let mut srv = Server {
        images,
        log,
        t0,
        tasks: Vec::new(),
        retry: Vec::new(),
        buf: vec![0; CHUNK_MAX.max(READAHEAD) as usize],
        chunk: CHUNK_MIN,
        next: 0,
        s: Summary::default(),
    };
    srv.note(format_args!("the restore connected"));
    if let Err(e) = srv.run(&conn) {
        srv.note(format_args!("failed: {e}"));
        // A process whose memory cannot be completed must not run on: once this server exits, its
        // missing pages would read as zeros.
        let pids: Vec<i32> = srv
            .tasks
            .iter()
            .filter(|t| !t.gone)
            .map(|t| t.pid)
            .collect();
        if pids.is_empty() {
            return Err(e);
        }
        for &pid in &pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        return Err(LazyError::Killed {
            source: Box::new(e),
            pids,
        });
    }
    srv.s.took = t0.elapsed();
    let s = srv.s.clone();
    srv.note(format_args!(
        "every page is in: {} process(es), {} MiB lazy: {} MiB on {} faults, {} MiB in the background, {} MiB dropped by the processes, {} zero pages",
        s.processes,
        s.lazy_bytes >> 20,
        s.fault_bytes >> 20,
        s.faults,
        s.background_bytes >> 20,
        s.dropped_bytes >> 20,
        s.zero_pages
    ));
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_restores_messages_are_split_as_criu_sends_them() {
        let mut buf = Vec::new();
        buf.extend_from_slice(&1234i32.to_ne_bytes());
        assert_eq!(
            next_message(&buf, 0),
            Ok(None),
            "the fd's byte is still to come"
        );
        buf.push(0);
        assert_eq!(next_message(&buf, 1), Ok(Some((Message::Task(1234), 5))));
        assert!(next_message(&buf, 0).unwrap_err().contains("without"));
        let zombie = (-77i32).to_ne_bytes();
        assert_eq!(next_message(&zombie, 0), Ok(Some((Message::Zombie(77), 4))));
        let fin = RESTORE_FINISHED.to_ne_bytes();
        assert_eq!(next_message(&fin, 0), Ok(Some((Message::Finished, 4))));
        assert_eq!(next_message(&fin[..3], 0), Ok(None));
        assert!(next_message(&0i32.to_ne_bytes(), 0).is_err());
    }

    fn msg(event: u8, words: [u64; 3]) -> [u8; MSG_SIZE] {
        let mut m = [0u8; MSG_SIZE];
        m[0] = event;
        for (i, w) in words.iter().enumerate() {
            m[8 + 8 * i..16 + 8 * i].copy_from_slice(&w.to_ne_bytes());
        }
        m
    }

    #[test]
    fn userfaultfd_messages_are_parsed() {
        // pagefault: flags, address, ptid.
        assert_eq!(
            parse_event(&msg(0x12, [1, 0x7f00_0000_1234, 99])),
            Event::Fault(0x7f00_0000_1000)
        );
        assert_eq!(parse_event(&msg(0x13, [17, 0, 0])), Event::Fork(17));
        assert_eq!(
            parse_event(&msg(0x14, [0x1000, 0x9000, 0x2000])),
            Event::Remap {
                from: 0x1000,
                to: 0x9000,
                len: 0x2000
            }
        );
        assert_eq!(
            parse_event(&msg(0x15, [0x1000, 0x3000, 0])),
            Event::Remove {
                start: 0x1000,
                end: 0x3000
            }
        );
        assert_eq!(
            parse_event(&msg(0x16, [0x1000, 0x3000, 0])),
            Event::Unmap {
                start: 0x1000,
                end: 0x3000
            }
        );
        assert_eq!(parse_event(&msg(0x01, [0; 3])), Event::Other(1));
    }

    fn all(iovs: &Iovs) -> Vec<(u64, u64, u64)> {
        iovs.map.iter().map(|(&s, &(e, i))| (s, e, i)).collect()
    }

    #[test]
    fn taking_splits_ranges_and_keeps_their_image_address() {
        let mut v = Iovs::new(&[(0x1000, 0x5000), (0x8000, 0x9000)]);
        assert_eq!(v.bytes(), 0x5000);
        assert_eq!(v.containing(0x4fff).map(|i| i.start), Some(0x1000));
        assert_eq!(v.containing(0x5000), None);
        assert_eq!(
            v.take(0x2000, 0x3000),
            [Iov {
                start: 0x2000,
                end: 0x3000,
                img: 0x2000
            }]
        );
        assert_eq!(
            all(&v),
            [
                (0x1000, 0x2000, 0x1000),
                (0x3000, 0x5000, 0x3000),
                (0x8000, 0x9000, 0x8000)
            ]
        );
        // A range across several pieces and holes takes what is there.
        let got = v.take(0x1800, 0x8800);
        assert_eq!(
            got.iter().map(|i| (i.start, i.end)).collect::<Vec<_>>(),
            [(0x1800, 0x2000), (0x3000, 0x5000), (0x8000, 0x8800)]
        );
        assert_eq!(
            all(&v),
            [(0x1000, 0x1800, 0x1000), (0x8800, 0x9000, 0x8800)]
        );
        assert_eq!(v.bytes(), 0x800 + 0x800);
        assert!(v.take(0x5000, 0x8000).is_empty());
        assert_eq!(v.first().map(|i| i.start), Some(0x1000));
    }

    #[test]
    fn mremap_moves_ranges_and_their_data_follows() {
        let mut v = Iovs::new(&[(0x1000, 0x4000), (0x10000, 0x11000)]);
        // Move 0x2000..0x5000 to 0x20000 (over nothing), then 0x20000.. onto the old 0x10000 range.
        v.remap(0x2000, 0x20000, 0x3000);
        assert_eq!(
            all(&v),
            [
                (0x1000, 0x2000, 0x1000),
                (0x10000, 0x11000, 0x10000),
                (0x20000, 0x22000, 0x2000)
            ]
        );
        v.remap(0x20000, 0x10000, 0x2000);
        assert_eq!(
            all(&v),
            [(0x1000, 0x2000, 0x1000), (0x10000, 0x12000, 0x2000)]
        );
        assert_eq!(v.bytes(), 0x3000);
        // A move to lower addresses.
        v.remap(0x10000, 0x8000, 0x1000);
        assert_eq!(
            all(&v),
            [
                (0x1000, 0x2000, 0x1000),
                (0x8000, 0x9000, 0x2000),
                (0x11000, 0x12000, 0x3000)
            ]
        );
    }

    fn ext(start: u64, end: u64, data: Option<(usize, u64)>) -> Extent {
        Extent {
            start,
            end,
            lazy: true,
            data,
        }
    }

    #[test]
    fn reads_are_planned_across_layers() {
        let p = PAGE;
        let x = [
            ext(0, 2 * p, Some((2, 0))),
            ext(2 * p, 4 * p, Some((1, 8 * p))),
            ext(4 * p, 5 * p, None),
            ext(6 * p, 7 * p, Some((0, 0))),
        ];
        assert_eq!(
            read_plan(&x, p, 2 * p),
            Ok(vec![(0, 2, p, p), (p, 1, 8 * p, p)])
        );
        assert_eq!(read_plan(&x, 3 * p, p), Ok(vec![(0, 1, 9 * p, p)]));
        assert_eq!(read_plan(&x, 3 * p, 2 * p), Err(4 * p), "no data");
        assert_eq!(read_plan(&x, 5 * p, 2 * p), Err(5 * p), "a hole");
        assert_eq!(read_plan(&x, 6 * p, 2 * p), Err(7 * p), "past the end");
    }
}

/// The server against a real userfaultfd of this test process (root, or vm.unprivileged_userfaultfd;
/// the test says so and passes where neither is given), with a two-layer image chain on disk.
#[cfg(test)]
#[allow(unsafe_code)]
mod live {
    use super::*;
    use crate::criu_image::{Entry, PE_LAZY, PE_PARENT, PE_PRESENT, Pagemap};
    use nix::libc;
    use nix::sys::socket::{ControlMessage, sendmsg};
    use std::io::IoSlice;
    use std::os::fd::FromRawFd as _;

    /// Passes `fd` the way criu restore does: one dummy byte carrying it (SCM_RIGHTS).
    fn send_fd(conn: &UnixStream, fd: RawFd) {
        sendmsg::<()>(
            conn.as_raw_fd(),
            &[IoSlice::new(&[0])],
            &[ControlMessage::ScmRights(&[fd])],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
    }

    /// A pid no process has (above the largest pid_max): the kill of a failing server hits nothing.
    const PID: i32 = 0x3fff_fff0;
    const PAGES: u64 = 64;

    #[repr(C)]
    struct Api {
        api: u64,
        features: u64,
        ioctls: u64,
    }
    #[repr(C)]
    struct Register {
        start: u64,
        len: u64,
        mode: u64,
        ioctls: u64,
    }
    nix::ioctl_readwrite!(ioc_api, 0xAA, 0x3F, Api);
    nix::ioctl_readwrite!(ioc_register, 0xAA, 0x00, Register);

    /// A userfaultfd with MISSING faults registered on a fresh anonymous mapping of PAGES pages.
    fn registered() -> Option<(OwnedFd, u64)> {
        // SAFETY: the userfaultfd syscall takes flags only and returns a new descriptor or -1.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return None;
        }
        // SAFETY: a descriptor the kernel just returned, owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        let mut api = Api {
            api: 0xAA,
            // EVENT_FORK, EVENT_REMAP, EVENT_REMOVE, EVENT_UNMAP (what criu restore asks for).
            features: (1 << 1) | (1 << 2) | (1 << 3) | (1 << 6),
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes `api`, which outlives the call.
        unsafe { ioc_api(fd.as_raw_fd(), &mut api) }.ok()?;
        // SAFETY: a new private anonymous mapping; nothing else uses the range.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                (PAGES * PAGE) as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        let mut reg = Register {
            start: addr as u64,
            len: PAGES * PAGE,
            mode: 1,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes `reg`, which outlives the call.
        unsafe { ioc_register(fd.as_raw_fd(), &mut reg) }.ok()?;
        Some((fd, addr as u64))
    }

    fn byte(addr: u64) -> u8 {
        // SAFETY: `addr` is inside the test's mapping; a missing page blocks until the server
        // (another thread) brings it in.
        unsafe { std::ptr::read_volatile(addr as *const u8) }
    }

    fn e(vaddr: u64, nr_pages: u64, flags: u32) -> Entry {
        Entry {
            vaddr,
            nr_pages,
            flags,
        }
    }

    /// Pre-copy layer: pages 0..60 (page i filled with i + 1). Final dump: pages 10..12 changed
    /// (filled with 0xEE), the rest in the parent; pages 60..64 in no image (zero on fault).
    fn images(dir: &Path, base: u64) {
        let pre = dir.join("pre-1");
        let fin = dir.join("final");
        std::fs::create_dir_all(&pre).unwrap();
        std::fs::create_dir_all(&fin).unwrap();
        std::os::unix::fs::symlink("../pre-1", fin.join("parent")).unwrap();
        let write = |d: &Path, entries: Vec<Entry>, pages: Vec<u8>| {
            let pm = Pagemap {
                pages_id: 1,
                entries,
            };
            std::fs::write(
                d.join(format!("pagemap-{PID}.img")),
                criu_image::render(&pm),
            )
            .unwrap();
            std::fs::write(d.join("pages-1.img"), pages).unwrap();
        };
        let mut pages = Vec::new();
        for i in 0..60u8 {
            pages.extend(std::iter::repeat_n(i + 1, PAGE as usize));
        }
        write(&pre, vec![e(base, 60, PE_PRESENT | PE_LAZY)], pages);
        write(
            &fin,
            vec![
                e(base, 10, PE_PARENT | PE_LAZY),
                e(base + 10 * PAGE, 2, PE_PRESENT | PE_LAZY),
                e(base + 12 * PAGE, 48, PE_PARENT | PE_LAZY),
            ],
            vec![0xEE; 2 * PAGE as usize],
        );
        std::fs::write(
            fin.join(format!("mm-{PID}.img")),
            criu_image::render_mm(&[(base, base + PAGES * PAGE)]),
        )
        .unwrap();
    }

    /// Aborts the test process if it hangs (a page that never comes blocks its reader for good).
    fn watchdog() -> std::sync::mpsc::Sender<()> {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            if rx.recv_timeout(Duration::from_secs(60)).is_err() {
                eprintln!("lazy_pages live test: hung for 60 s");
                std::process::abort();
            }
        });
        tx
    }

    /// The server's thread: what `serve` returned and its log.
    type Running = std::thread::JoinHandle<(Result<Summary, LazyError>, String)>;

    fn start(dir: &Path) -> (Running, UnixStream) {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let d = dir.to_path_buf();
        let server = std::thread::spawn(move || {
            let mut log = Vec::new();
            let r = serve(&d, move || ready_tx.send(()).unwrap(), &mut log);
            (r, String::from_utf8_lossy(&log).into_owned())
        });
        ready_rx.recv().unwrap();
        let conn = UnixStream::connect(dir.join(SOCKET)).unwrap();
        (server, conn)
    }

    #[test]
    fn faults_and_background_bring_every_page_in_from_the_chain() {
        let Some((uffd, base)) = registered() else {
            eprintln!("no userfaultfd here (not root, vm.unprivileged_userfaultfd = 0): skipped");
            return;
        };
        let done = watchdog();
        let root = tempfile::tempdir().unwrap();
        images(root.path(), base);
        let fin = root.path().join("final");
        let (server, mut conn) = start(&fin);
        // What criu restore sends: a zombie, then the pid and its userfaultfd (one dummy byte).
        conn.write_all(&(-5i32).to_ne_bytes()).unwrap();
        conn.write_all(&PID.to_ne_bytes()).unwrap();
        send_fd(&conn, uffd.as_raw_fd());
        // The server holds the only descriptor now: once it is done, the range is unregistered.
        drop(uffd);
        // Faults before the restore finished: a parent page, a final-dump page, a page in no image.
        assert_eq!(byte(base + 3 * PAGE + 17), 4);
        assert_eq!(byte(base + 11 * PAGE), 0xEE);
        assert_eq!(byte(base + 62 * PAGE), 0);
        // The process drops pages 20..22 (REMOVE: the kernel's zero pages from now on) and unmaps
        // 40..50 (UNMAP); each call returns once the server has read its event.
        // SAFETY: ranges inside the test's own mapping, which nothing else references.
        unsafe {
            assert_eq!(
                libc::madvise(
                    (base + 20 * PAGE) as *mut libc::c_void,
                    (2 * PAGE) as usize,
                    libc::MADV_DONTNEED
                ),
                0
            );
            assert_eq!(
                libc::munmap(
                    (base + 40 * PAGE) as *mut libc::c_void,
                    (10 * PAGE) as usize
                ),
                0
            );
        }
        assert_eq!(byte(base + 21 * PAGE), 0);
        // And moves 30..34 elsewhere (REMAP): their data follows them.
        // SAFETY: a range inside the test's own mapping, which nothing else references.
        // SAFETY: a fresh mapping (the destination), then a move inside the test's own mappings.
        let moved = unsafe {
            let dst = libc::mmap(
                std::ptr::null_mut(),
                (4 * PAGE) as usize,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(dst, libc::MAP_FAILED);
            libc::mremap(
                (base + 30 * PAGE) as *mut libc::c_void,
                (4 * PAGE) as usize,
                (4 * PAGE) as usize,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                dst,
            )
        };
        assert_ne!(moved, libc::MAP_FAILED);
        let moved = moved as u64;
        assert_ne!(moved, base + 30 * PAGE);
        assert_eq!(byte(moved + PAGE), 32);
        // A child (FORK: it gets its own userfaultfd and a copy of the plan) reads a page neither
        // it nor its parent has yet, and exits.
        // SAFETY: the child only reads its memory and _exits (nothing that could wait on a lock
        // another thread of this test process held at the fork); clone(SIGCHLD) is fork.
        // The raw syscall, not glibc's fork(): that one holds malloc's locks across the syscall,
        // which waits here until the server thread (which allocates) has read the FORK event.
        let child =
            unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_long, 0, 0, 0, 0) }
                as libc::pid_t;
        if child == 0 {
            let ok = byte(base + 25 * PAGE + 1) == 26;
            // SAFETY: leaves the child at once, without running the parent's exit handlers.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(child), None).unwrap();
        assert_eq!(
            status,
            nix::sys::wait::WaitStatus::Exited(nix::unistd::Pid::from_raw(child), 0),
            "the forked child read its page"
        );
        conn.write_all(&RESTORE_FINISHED.to_ne_bytes()).unwrap();
        let (r, log) = server.join().unwrap();
        let s = r.unwrap_or_else(|e| panic!("{e}\n{log}"));
        for i in 30..34 {
            assert_eq!(
                byte(moved + (i - 30) * PAGE + 9),
                i as u8 + 1,
                "moved page {i}"
            );
        }
        for i in (0..30).chain(34..40).chain(50..PAGES) {
            let want = match i {
                10 | 11 => 0xEE,
                20 | 21 | 60.. => 0,
                _ => i as u8 + 1,
            };
            assert_eq!(byte(base + i * PAGE + 4095), want, "page {i}\n{log}");
        }
        assert_eq!(s.processes, 1);
        assert_eq!(s.lazy_bytes, 60 * PAGE);
        // The parent's 60 pages (48 in, 12 dropped), and the child's plan, the 37 pages its
        // parent still lacked at the fork: what it got before it exited, the rest dropped when its
        // memory was gone.
        assert!(s.fault_bytes + s.background_bytes >= 48 * PAGE, "{s:?}");
        assert_eq!(
            s.fault_bytes + s.background_bytes + s.dropped_bytes,
            (60 + 37) * PAGE,
            "{s:?}"
        );
        assert!(log.contains("forked"), "{log}");
        assert_eq!((s.faults, s.zero_pages), (4, 1), "{s:?}");
        assert!(
            log.contains("a zombie") && log.contains("every page is in"),
            "{log}"
        );
        done.send(()).unwrap();
    }

    #[test]
    fn a_restore_that_goes_away_unfinished_is_an_error_and_images_without_the_pid_too() {
        let root = tempfile::tempdir().unwrap();
        let (server, conn) = start(root.path());
        drop(conn);
        let (r, _) = server.join().unwrap();
        assert!(matches!(r, Err(LazyError::RestoreGone(_))), "{r:?}");
        // A pid whose pagemap is not in the images.
        let (server, conn) = start(root.path());
        (&conn).write_all(&7i32.to_ne_bytes()).unwrap();
        let (a, _b) = UnixStream::pair().unwrap();
        send_fd(&conn, a.as_raw_fd());
        let (r, _) = server.join().unwrap();
        let err = r.unwrap_err().to_string();
        assert!(err.contains("pagemap-7.img"), "{err}");
        // Nothing but "finished": done at once.
        let (server, mut conn) = start(root.path());
        conn.write_all(&RESTORE_FINISHED.to_ne_bytes()).unwrap();
        let (r, _) = server.join().unwrap();
        assert_eq!(r.unwrap().processes, 0);
    }
}
