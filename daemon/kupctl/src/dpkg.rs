//! Waiting for the package manager: an update started from a kernel package's hook must not
//! switch kernel while dpkg (or apt around it) is still installing.
//!
//! dpkg and apt hold POSIX record locks (fcntl) on `/var/lib/dpkg/lock` and
//! `/var/lib/dpkg/lock-frontend` for their whole run. `flock(1)` cannot see those, so the lock
//! table in `/proc/locks` is read instead.

use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::time::Duration;

/// The locks dpkg and apt hold while they run.
pub const LOCKS: [&str; 2] = ["/var/lib/dpkg/lock-frontend", "/var/lib/dpkg/lock"];

/// `(major, minor)` of a `st_dev`, as the kernel's `MAJOR()`/`MINOR()` of a `new_encode_dev`.
fn split_dev(dev: u64) -> (u64, u64) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major, minor)
}

/// The PID holding a lock on the file (device `major:minor`, inode `ino`) in a `/proc/locks`
/// text, if any. Pure. Lines look like
/// `1: POSIX  ADVISORY  WRITE 1234 fe:01:131090 0 EOF` (device numbers in hex).
#[must_use]
pub fn holder(proc_locks: &str, major: u64, minor: u64, ino: u64) -> Option<u32> {
    proc_locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Blocked waiters are listed as "1: -> POSIX ..."; only holders count.
        if fields.get(1) == Some(&"->") {
            return None;
        }
        let pid = fields.get(4)?.parse().ok()?;
        let mut id = fields.get(5)?.split(':');
        let maj = u64::from_str_radix(id.next()?, 16).ok()?;
        let min = u64::from_str_radix(id.next()?, 16).ok()?;
        let inode: u64 = id.next()?.parse().ok()?;
        (maj == major && min == minor && inode == ino).then_some(pid)
    })
}

/// The PID of a process holding one of the dpkg locks now, with the lock's path.
#[must_use]
pub fn busy() -> Option<(u32, &'static str)> {
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    LOCKS.iter().find_map(|path| {
        let meta = std::fs::metadata(Path::new(path)).ok()?;
        let (major, minor) = split_dev(meta.dev());
        holder(&locks, major, minor, meta.ino()).map(|pid| (pid, *path))
    })
}

/// Returns once no process holds a dpkg lock; `say` is told once what is being waited for.
pub async fn wait(say: &mut dyn FnMut(&str)) {
    let mut told = false;
    while let Some((pid, path)) = busy() {
        if !told {
            say(&format!(
                "kupctl: waiting for the package manager (PID {pid} holds {path}) to finish before updating"
            ));
            told = true;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCKS_TEXT: &str = "\
1: POSIX  ADVISORY  WRITE 4242 fe:01:131090 0 EOF
1: -> POSIX  ADVISORY  WRITE 5151 fe:01:131090 0 EOF
2: FLOCK  ADVISORY  WRITE 77 00:1a:999 0 EOF
3: OFDLCK ADVISORY  READ  -1 00:06:12 0 EOF
";

    #[test]
    fn the_holder_of_a_file_lock_is_found_by_device_and_inode() {
        assert_eq!(holder(LOCKS_TEXT, 0xfe, 1, 131_090), Some(4242));
        assert_eq!(holder(LOCKS_TEXT, 0, 0x1a, 999), Some(77));
        assert_eq!(holder(LOCKS_TEXT, 0xfe, 2, 131_090), None, "other device");
        assert_eq!(holder(LOCKS_TEXT, 0xfe, 1, 131_091), None, "other inode");
        assert_eq!(holder("", 0xfe, 1, 131_090), None);
    }

    #[test]
    fn device_numbers_split_like_the_kernel() {
        // makedev(254, 1) and makedev(259, 300000)
        assert_eq!(split_dev(0xfe01), (254, 1));
        let dev = (259 & 0xfff) << 8 | (300_000 & 0xff) | ((300_000 & !0xff) << 12);
        assert_eq!(split_dev(dev), (259, 300_000));
    }

    #[test]
    fn a_lock_held_by_this_process_is_seen() {
        use std::os::fd::AsRawFd as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("lock");
        let file = std::fs::File::create(&path).expect("create");
        let meta = file.metadata().expect("stat");
        let (major, minor) = split_dev(meta.dev());
        let mut lock = nix::libc::flock {
            l_type: nix::libc::F_WRLCK as i16,
            l_whence: nix::libc::SEEK_SET as i16,
            l_start: 0,
            l_len: 0,
            l_pid: 0,
        };
        nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_SETLK(&lock)).expect("lock");
        let text = std::fs::read_to_string("/proc/locks").expect("/proc/locks");
        assert_eq!(
            holder(&text, major, minor, meta.ino()),
            Some(std::process::id()),
            "fd {}",
            file.as_raw_fd()
        );
        lock.l_type = nix::libc::F_UNLCK as i16;
        nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_SETLK(&lock)).expect("unlock");
        let text = std::fs::read_to_string("/proc/locks").expect("/proc/locks");
        assert_eq!(holder(&text, major, minor, meta.ino()), None);
    }
}
