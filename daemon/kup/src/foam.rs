//! FOAM (file-offset-based address mapping), kup's store for the memory of a checkpointed unit: in
//! each process's file, the file offset is the page's virtual address.
//!
//! A unit's FOAM lives in `IMAGES/foam/`: one directory per CRIU pagemap (`pagemap-PID` for a
//! process, `pagemap-shmem-ID` for a shared-memory object), named like the pagemap image it stands
//! for. In it, one sparse file per 8 TiB slice of the address space (`SLICE.foam`, hexadecimal):
//! page `vaddr` is at offset `vaddr % 8 TiB` of slice `vaddr / 8 TiB`. (ext4 caps a file at 16 TiB
//! and a process's mappings span up to 128 TiB: a process has two slices in practice, its binary
//! and heap low, its libraries and stack high.) Unmapped and absent pages are holes.
//!
//! Every pre-copy round and the final dump write the pages they copy in place, and the pages the
//! process no longer has are punched out ([`crate::page_server`] drives this from CRIU's
//! page-server protocol): the files always hold exactly the memory of the last round, with no
//! chain of parent images and nothing to merge. For the restore, kup writes CRIU's own pagemap
//! next to them ([`write_restore_images`]: every page present, lazy where CRIU may leave it to a
//! lazy-pages server, and a sparse pages file with only the pages CRIU reads itself); kup's
//! lazy-pages server reads a faulting page at its own address ([`process_extents`]). The image
//! check compares the files' data extents (`SEEK_DATA`/`SEEK_HOLE`) with that pagemap ([`check`]).
//!
//! Memory kept in place (the luo backend's PPP, `kernel-patches/README.md`): a process's pages are
//! not copied into FOAM at all. Its directory holds only the marker [`IN_PLACE`] while the old
//! kernel keeps the memory where the process had it; on the new kernel the claim puts the memfd the
//! kernel hands back there as [`WHOLE`]: one file for the whole address space, page `vaddr` at
//! offset `vaddr`. Readers take either layout.
//!
//! [`place`], [`pieces`], [`subtract`] and [`merge_ranges`] are pure; the rest does the I/O.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::criu_image::{self, Entry, Extent, PE_LAZY, PE_PRESENT, Pagemap};

/// The directory of a unit's FOAM, inside its image directory.
pub const DIR: &str = "foam";
/// In a pagemap's directory: its process's memory is kept in place (PPP); none of it is copied.
pub const IN_PLACE: &str = "in-place";
/// In a pagemap's directory kept in place: the pages of the kernel's special mappings (the vDSO,
/// which the kernel does not keep), dense, and where each belongs ([`SPECIAL_MAP`]: one line per
/// page, `ADDRESS OFFSET` in hexadecimal).
pub const SPECIAL_DATA: &str = "special.data";
pub const SPECIAL_MAP: &str = "special.map";
/// In a pagemap's directory: the whole address space in one file, page `vaddr` at offset `vaddr`
/// (the memory kept in place, as the new kernel hands it back: a memfd).
pub const WHOLE: &str = "whole.foam";
/// log2 of a slice's size (8 TiB: below ext4's 16 TiB file size limit).
pub const SLICE_SHIFT: u32 = 43;
const SLICE_MASK: u64 = (1 << SLICE_SHIFT) - 1;
const PAGE: u64 = 4096;

/// Why a FOAM store cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FoamError {
    #[error("FOAM store {path}: cannot {op}: {source}")]
    Io {
        op: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error(
        "FOAM store {path} does not match its pagemap ({reason}); the checkpoint is damaged: dump again"
    )]
    Inconsistent { path: String, reason: String },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FoamError {
    let path = path.display().to_string();
    move |source| FoamError::Io { op, path, source }
}

/// Slice and offset of address `vaddr`.
pub fn place(vaddr: u64) -> (u64, u64) {
    (vaddr >> SLICE_SHIFT, vaddr & SLICE_MASK)
}

/// `start..end` cut where slices end: `(slice, offset, len)` pieces, in order.
pub fn pieces(start: u64, end: u64) -> Vec<(u64, u64, u64)> {
    let mut out = Vec::new();
    let mut at = start;
    while at < end {
        let (slice, offset) = place(at);
        let slice_end = (slice + 1) << SLICE_SHIFT;
        let to = end.min(slice_end);
        out.push((slice, offset, to - at));
        at = to;
    }
    out
}

/// Sorted, coalesced `(start, end)` ranges.
pub fn merge_ranges(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (a, b) in ranges.into_iter().filter(|(a, b)| a < b) {
        match out.last_mut() {
            Some(l) if a <= l.1 => l.1 = l.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// What of `a` is not in `b` (both sorted and coalesced).
pub fn subtract(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(s, e) in a {
        let mut at = s;
        let from = b.partition_point(|r| r.1 <= s);
        for &(bs, be) in b[from..].iter().take_while(|r| r.0 < e) {
            if bs > at {
                out.push((at, bs));
            }
            at = at.max(be);
        }
        if at < e {
            out.push((at, e));
        }
    }
    out
}

/// The address ranges of pagemap entries (all of them, whatever their flags), coalesced.
pub fn entry_ranges(entries: &[Entry]) -> Vec<(u64, u64)> {
    merge_ranges(
        entries
            .iter()
            .map(|e| (e.vaddr, e.vaddr + e.nr_pages * PAGE))
            .collect(),
    )
}

/// The file name of a slice in a pagemap's directory.
pub fn slice_name(slice: u64) -> String {
    format!("{slice:x}.foam")
}

/// The slice files of one pagemap's directory: `(slice, path)`, sorted; none when the directory is
/// missing (a pagemap that never got a page, e.g. an untouched shared mapping).
pub fn slice_files(dir: &Path) -> Result<Vec<(u64, PathBuf)>, FoamError> {
    let mut out = Vec::new();
    if !dir.exists() {
        return Ok(out);
    }
    for e in std::fs::read_dir(dir)
        .map_err(io_err("list", dir))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(hex) = name.strip_suffix(".foam") else {
            continue;
        };
        if name == WHOLE {
            continue;
        }
        let slice = u64::from_str_radix(hex, 16).map_err(|_| FoamError::Inconsistent {
            path: dir.display().to_string(),
            reason: format!("{name} is not a slice file"),
        })?;
        out.push((slice, e.path()));
    }
    out.sort();
    Ok(out)
}

/// The address ranges holding data in one pagemap's directory (its files' extents).
pub fn data_ranges(dir: &Path) -> Result<Vec<(u64, u64)>, FoamError> {
    let mut out = Vec::new();
    for (slice, path) in slice_files(dir)? {
        out.extend(file_extents(&path, slice << SLICE_SHIFT)?);
    }
    if dir.join(WHOLE).exists() {
        out.extend(file_extents(&dir.join(WHOLE), 0)?);
    }
    Ok(merge_ranges(out))
}

/// The data extents (`SEEK_DATA`/`SEEK_HOLE`) of the file at `path`, as addresses from `base`.
fn file_extents(path: &Path, base: u64) -> Result<Vec<(u64, u64)>, FoamError> {
    use nix::unistd::{Whence, lseek};
    let f = File::open(path).map_err(io_err("open", path))?;
    let len = f.metadata().map_err(io_err("stat", path))?.len() as i64;
    let mut out = Vec::new();
    let mut at = 0i64;
    while at < len {
        let data = match lseek(&f, at, Whence::SeekData) {
            Ok(d) => d,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(io_err("seek in", path)(e.into())),
        };
        let hole =
            lseek(&f, data, Whence::SeekHole).map_err(|e| io_err("seek in", path)(e.into()))?;
        out.push((base + data as u64, base + hole as u64));
        at = hole;
    }
    Ok(out)
}

/// A unit's FOAM store, open for writing (the dumping side).
#[derive(Debug)]
pub struct Foam {
    root: PathBuf,
    files: HashMap<(String, u64), File>,
}

impl Foam {
    /// An empty store at `root` (whatever was there is removed).
    pub fn create(root: &Path) -> Result<Self, FoamError> {
        if root.exists() {
            std::fs::remove_dir_all(root).map_err(io_err("remove", root))?;
        }
        std::fs::create_dir_all(root).map_err(io_err("create", root))?;
        Ok(Self {
            root: root.to_path_buf(),
            files: HashMap::new(),
        })
    }

    /// Where the store is.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The slice file of pagemap `name` holding `slice`, created when missing.
    pub fn file(&mut self, name: &str, slice: u64) -> Result<&File, FoamError> {
        let key = (name.to_owned(), slice);
        if !self.files.contains_key(&key) {
            let dir = self.root.join(name);
            std::fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
            let path = dir.join(slice_name(slice));
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(io_err("open", &path))?;
            self.files.insert(key.clone(), f);
        }
        self.files
            .get(&key)
            .ok_or_else(|| io_err("open", &self.root)(std::io::ErrorKind::NotFound.into()))
    }

    /// Makes `start..end` of pagemap `name` a hole (pages the process no longer has).
    pub fn punch(&mut self, name: &str, start: u64, end: u64) -> Result<(), FoamError> {
        use nix::fcntl::{FallocateFlags, fallocate};
        for (slice, offset, len) in pieces(start, end) {
            let path = self.root.join(name).join(slice_name(slice));
            if !path.exists() {
                continue;
            }
            let f = self.file(name, slice)?;
            fallocate(
                f,
                FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                offset as i64,
                len as i64,
            )
            .map_err(|e| io_err("punch a hole in", &path)(e.into()))?;
        }
        Ok(())
    }

    /// Removes pagemap `name` (a process gone since the last round).
    pub fn remove(&mut self, name: &str) -> Result<(), FoamError> {
        self.files.retain(|(n, _), _| n != name);
        let dir = self.root.join(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io_err("remove", &dir))?;
        }
        Ok(())
    }

    /// Pagemap directories in the store.
    pub fn names(&self) -> Result<Vec<String>, FoamError> {
        names(&self.root)
    }

    /// Flushes every file to disk.
    pub fn sync(&self) -> Result<(), FoamError> {
        for ((name, slice), f) in &self.files {
            f.sync_data().map_err(io_err(
                "sync",
                &self.root.join(name).join(slice_name(*slice)),
            ))?;
        }
        Ok(())
    }
}

fn names(root: &Path) -> Result<Vec<String>, FoamError> {
    let mut out: Vec<String> = std::fs::read_dir(root)
        .map_err(io_err("list", root))?
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    out.sort();
    Ok(out)
}

/// Reads `buf.len()` bytes at address `vaddr` of pagemap directory `dir` (a missing slice reads as
/// a hole would: zeros).
fn read_at(dir: &Path, vaddr: u64, buf: &mut [u8]) -> Result<(), FoamError> {
    let whole = dir.join(WHOLE);
    if whole.exists() {
        let f = File::open(&whole).map_err(io_err("open", &whole))?;
        return f.read_exact_at(buf, vaddr).map_err(io_err("read", &whole));
    }
    read_slices_at(dir, vaddr, buf)
}

/// [`read_at`] from the slice files only.
fn read_slices_at(dir: &Path, vaddr: u64, buf: &mut [u8]) -> Result<(), FoamError> {
    let mut done = 0usize;
    for (slice, offset, len) in pieces(vaddr, vaddr + buf.len() as u64) {
        let part = &mut buf[done..done + len as usize];
        let path = dir.join(slice_name(slice));
        match File::open(&path) {
            Ok(f) => f
                .read_exact_at(part, offset)
                .map_err(io_err("read", &path))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => part.fill(0),
            Err(e) => return Err(io_err("open", &path)(e)),
        }
        done += len as usize;
    }
    Ok(())
}

/// Copies `len` bytes at address `vaddr` of pagemap directory `dir` into `out` at `at`.
fn copy_out(dir: &Path, vaddr: u64, len: u64, out: &File, at: u64) -> Result<(), FoamError> {
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        read_at(dir, vaddr + done, &mut buf[..n])?;
        out.write_all_at(&buf[..n], at + done)
            .map_err(|source| FoamError::Io {
                op: "write",
                path: "a pages image".into(),
                source,
            })?;
        done += n as u64;
    }
    Ok(())
}

/// Writes, into the image directory `images`, CRIU's pagemap and pages files for the memory in
/// `foam` (`present`: each pagemap's pages, `PE_PRESENT` and `PE_LAZY` where CRIU may leave them to
/// a lazy-pages server). The pages files are sparse: only the pages CRIU reads itself at a lazy
/// restore (those not lazy: stacks, ...) are copied in; [`fill_pages_files`] copies the rest for an
/// eager restore.
pub fn write_restore_images(
    foam: &Path,
    images: &Path,
    present: &BTreeMap<String, Vec<Entry>>,
) -> Result<(), FoamError> {
    for (i, (name, entries)) in present.iter().enumerate() {
        let kept = in_place(&foam.join(name));
        let pm = Pagemap {
            pages_id: i as u32 + 1,
            entries: if kept {
                without_lazy_data(entries)
            } else {
                entries.clone()
            },
        };
        let pages_path = images.join(format!("pages-{}.img", pm.pages_id));
        let pages = File::create(&pages_path).map_err(io_err("create", &pages_path))?;
        let total: u64 = pm
            .entries
            .iter()
            .filter(|e| e.flags & PE_PRESENT != 0)
            .map(|e| e.nr_pages * PAGE)
            .sum();
        pages.set_len(total).map_err(io_err("size", &pages_path))?;
        let mut at = 0;
        for e in pm.entries.iter().filter(|e| e.flags & PE_PRESENT != 0) {
            let len = e.nr_pages * PAGE;
            // Kept in place: the pages CRIU reads itself are copied in on the new kernel
            // ([`fill_in_place`]), from the memory the kernel hands back.
            if e.flags & PE_LAZY == 0 && !kept {
                copy_out(&foam.join(name), e.vaddr, len, &pages, at)?;
            }
            at += len;
        }
        let pm_path = images.join(format!("{name}.img"));
        std::fs::write(&pm_path, criu_image::render(&pm)).map_err(io_err("write", &pm_path))?;
    }
    Ok(())
}

/// A pagemap of memory kept in place, for CRIU: the lazy pages are `PE_LAZY` alone, as in CRIU's
/// own lazy dumps (not `PE_PRESENT`: no room for them in the pages file, which then holds only the
/// few pages CRIU reads itself; LUO would allocate every hole of a sparse one).
pub fn without_lazy_data(entries: &[Entry]) -> Vec<Entry> {
    entries
        .iter()
        .map(|e| Entry {
            flags: if e.flags & PE_LAZY != 0 {
                PE_LAZY
            } else {
                e.flags
            },
            ..*e
        })
        .collect()
}

/// Pagemaps (their `name` without `.img`) of `images` that come with a FOAM directory.
fn foam_pagemaps(images: &Path) -> Result<Vec<(String, Pagemap)>, FoamError> {
    let root = images.join(DIR);
    let mut out = Vec::new();
    for name in names(&root)? {
        let path = images.join(format!("{name}.img"));
        let bytes = std::fs::read(&path).map_err(|_| FoamError::Inconsistent {
            path: root.display().to_string(),
            reason: format!("{name} has no pagemap image {}", path.display()),
        })?;
        let pm = criu_image::parse(&bytes).map_err(|reason| FoamError::Inconsistent {
            path: path.display().to_string(),
            reason,
        })?;
        out.push((name, pm));
    }
    Ok(out)
}

/// Checks the FOAM of the image directory `images`: every FOAM directory has its pagemap, whose
/// entries are all present (no parent images), and the files hold data exactly where the pagemap
/// lists pages (a page missing, or one the process no longer had, fails). Returns the bytes.
pub fn check(images: &Path) -> Result<u64, FoamError> {
    let mut bytes = 0;
    for (name, pm) in foam_pagemaps(images)? {
        let dir = images.join(DIR).join(&name);
        let bad = |reason: String| FoamError::Inconsistent {
            path: dir.display().to_string(),
            reason,
        };
        let kept = in_place(&dir);
        // Kept in place, lazy pages are `PE_LAZY` alone ([`without_lazy_data`]).
        if let Some(e) = pm
            .entries
            .iter()
            .find(|e| e.flags & PE_PRESENT == 0 && !(kept && e.flags == PE_LAZY))
        {
            return Err(bad(format!(
                "its pagemap leaves {} pages at {:#x} to a parent image",
                e.nr_pages, e.vaddr
            )));
        }
        let want = entry_ranges(&pm.entries);
        let whole = dir.join(WHOLE).exists();
        if kept && !whole {
            // The old kernel, before the switch: the memory is where the process has it.
            bytes += want.iter().map(|(a, b)| b - a).sum::<u64>();
            continue;
        }
        let have = data_ranges(&dir)?;
        if let Some(&(a, b)) = subtract(&want, &have).first() {
            return Err(bad(format!(
                "{} pages from {a:#x} are listed but not stored",
                (b - a) / PAGE
            )));
        }
        // Kept in place, the kernel handed back every anonymous page the process had: some it
        // may have that CRIU does not restore (none of CRIU's pagemap) are harmless.
        if let Some(&(a, b)) = subtract(&have, &want).first().filter(|_| !whole) {
            return Err(bad(format!(
                "{} pages from {a:#x} are stored but not listed",
                (b - a) / PAGE
            )));
        }
        bytes += want.iter().map(|(a, b)| b - a).sum::<u64>();
    }
    Ok(bytes)
}

/// Copies the lazy pages of every FOAM pagemap of `images` into its pages file, so that CRIU
/// restores them all itself (an eager restore). Returns the bytes copied.
pub fn fill_pages_files(images: &Path) -> Result<u64, FoamError> {
    fill(images, |dir, e| e.flags & PE_LAZY != 0 || in_place(dir))
}

/// Copies the pages CRIU reads itself at a lazy restore (those not `PE_LAZY`: stacks, ...) of
/// every pagemap kept in place into its pages file, from the memory the kernel handed back
/// ([`WHOLE`]). Returns the bytes copied.
pub fn fill_in_place(images: &Path) -> Result<u64, FoamError> {
    fill(images, |dir, e| e.flags & PE_LAZY == 0 && in_place(dir))
}

/// [`SPECIAL_MAP`]'s text for page address -> offset in [`SPECIAL_DATA`].
pub fn render_special_map(pages: &BTreeMap<u64, u64>) -> String {
    pages
        .iter()
        .map(|(a, o)| format!("{a:x} {o:x}\n"))
        .collect()
}

/// Parses [`SPECIAL_MAP`]'s text.
pub fn parse_special_map(text: &str) -> Result<Vec<(u64, u64)>, String> {
    text.lines()
        .map(|l| {
            let (a, o) = l
                .split_once(' ')
                .ok_or_else(|| format!("{l:?} is not `ADDRESS OFFSET`"))?;
            let hex = |v: &str| u64::from_str_radix(v, 16).map_err(|e| format!("{v:?}: {e}"));
            Ok((hex(a)?, hex(o)?))
        })
        .collect()
}

/// Memory kept in place, on the new kernel: the special pages stored beside it
/// ([`SPECIAL_DATA`], the vDSO's) are copied into [`WHOLE`] at their addresses, so that it alone
/// holds the process's memory. Returns the bytes copied.
pub fn merge_into_whole(images: &Path) -> Result<u64, FoamError> {
    let mut copied = 0;
    let root = images.join(DIR);
    if !root.is_dir() {
        return Ok(0);
    }
    for name in names(&root)? {
        let dir = root.join(&name);
        let (whole_path, map_path) = (dir.join(WHOLE), dir.join(SPECIAL_MAP));
        if !whole_path.exists() || !map_path.exists() {
            continue;
        }
        let map = std::fs::read_to_string(&map_path).map_err(io_err("read", &map_path))?;
        let map = parse_special_map(&map).map_err(|reason| FoamError::Inconsistent {
            path: map_path.display().to_string(),
            reason,
        })?;
        // No special page stored (a process restored by CRIU before has its vDSO copy anonymous).
        if map.is_empty() {
            continue;
        }
        let data_path = dir.join(SPECIAL_DATA);
        let data = File::open(&data_path).map_err(io_err("open", &data_path))?;
        let whole = std::fs::OpenOptions::new()
            .write(true)
            .open(&whole_path)
            .map_err(io_err("open", &whole_path))?;
        let mut buf = vec![0u8; PAGE as usize];
        for (addr, off) in map {
            data.read_exact_at(&mut buf, off)
                .map_err(io_err("read", &data_path))?;
            whole
                .write_all_at(&buf, addr)
                .map_err(io_err("write", &whole_path))?;
            copied += PAGE;
        }
    }
    Ok(copied)
}

/// Whether a pagemap directory's memory is kept in place ([`IN_PLACE`] or [`WHOLE`] in it).
pub fn in_place(dir: &Path) -> bool {
    dir.join(IN_PLACE).exists() || dir.join(WHOLE).exists()
}

/// Copies the pages of every FOAM pagemap of `images` that `want` picks into its pages file.
fn fill(images: &Path, want: impl Fn(&Path, &Entry) -> bool) -> Result<u64, FoamError> {
    let mut copied = 0;
    for (name, pm) in foam_pagemaps(images)? {
        let dir = images.join(DIR).join(&name);
        let path = images.join(format!("pages-{}.img", pm.pages_id));
        let pages = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io_err("open", &path))?;
        let mut at = 0;
        for e in pm.entries.iter().filter(|e| e.flags & PE_PRESENT != 0) {
            let len = e.nr_pages * PAGE;
            if want(&dir, e) {
                copy_out(&dir, e.vaddr, len, &pages, at)?;
                copied += len;
            }
            at += len;
        }
        pages.sync_data().map_err(io_err("sync", &path))?;
    }
    Ok(copied)
}

/// A process's slice files and its page ranges with their data's `(file index, offset)`.
pub type SliceExtents = (Vec<PathBuf>, Vec<Extent>);

/// Where process `pid`'s memory is, for kup's lazy-pages server, when `images` keeps it in FOAM:
/// the slice files and, for each page range of its pagemap, `(index in those files, offset)`.
/// `None` when the images have no FOAM for it (CRIU's own pages files hold the data).
pub fn process_extents(
    images: &Path,
    pid: i32,
    entries: &[Entry],
) -> Result<Option<SliceExtents>, FoamError> {
    let dir = images.join(DIR).join(format!("pagemap-{pid}"));
    if !dir.is_dir() {
        return Ok(None);
    }
    let mut extents = Vec::with_capacity(entries.len());
    if dir.join(WHOLE).exists() {
        for e in entries {
            extents.push(Extent {
                start: e.vaddr,
                end: e.vaddr + e.nr_pages * PAGE,
                lazy: e.flags & PE_LAZY != 0,
                data: Some((0, e.vaddr)),
            });
        }
        return Ok(Some((vec![dir.join(WHOLE)], extents)));
    }
    let files = slice_files(&dir)?;
    for e in entries {
        let start = e.vaddr;
        for (slice, offset, len) in pieces(start, start + e.nr_pages * PAGE) {
            let index = files.iter().position(|(s, _)| *s == slice).ok_or_else(|| {
                FoamError::Inconsistent {
                    path: dir.display().to_string(),
                    reason: format!("no slice file for the pages at {start:#x}"),
                }
            })?;
            let from = (slice << SLICE_SHIFT) + offset;
            extents.push(Extent {
                start: from,
                end: from + len,
                lazy: e.flags & PE_LAZY != 0,
                data: Some((index, offset)),
            });
        }
    }
    Ok(Some((files.into_iter().map(|(_, p)| p).collect(), extents)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_map_to_slices_below_ext4s_file_size_limit() {
        assert_eq!(place(0x5555_5555_5000), (0xa, 0x555_5555_5000));
        assert_eq!(place(0x7ffc_0000_0000), (0xf, 0x7fc_0000_0000));
        // ext4 with 4 KiB blocks: files up to 16 TiB - 4 KiB.
        const { assert!(SLICE_MASK < (1u64 << 44) - 4096) };
        let boundary = 1u64 << SLICE_SHIFT;
        assert_eq!(
            pieces(boundary - 8192, boundary + 4096),
            vec![(0, boundary - 8192, 8192), (1, 0, 4096)]
        );
        assert_eq!(pieces(0x1000, 0x1000), vec![]);
    }

    #[test]
    fn range_arithmetic() {
        assert_eq!(
            merge_ranges(vec![(5, 8), (0, 2), (2, 4), (7, 9), (3, 3)]),
            vec![(0, 4), (5, 9)]
        );
        assert_eq!(
            subtract(&[(0, 10), (20, 30)], &[(2, 4), (8, 22), (25, 26)]),
            vec![(0, 2), (4, 8), (22, 25), (26, 30)]
        );
        assert_eq!(subtract(&[(0, 10)], &[]), vec![(0, 10)]);
        assert_eq!(subtract(&[(0, 10)], &[(0, 10)]), vec![]);
    }

    fn entry(vaddr: u64, nr_pages: u64, flags: u32) -> Entry {
        Entry {
            vaddr,
            nr_pages,
            flags,
        }
    }

    #[test]
    fn stored_pages_are_their_data_extents_and_the_check_catches_a_missing_or_stale_page() {
        let tmp = tempfile::tempdir().unwrap();
        let images = tmp.path();
        let mut foam = Foam::create(&images.join(DIR)).unwrap();
        let high = 0x7ffc_0000_0000u64;
        let page = |b: u8| vec![b; PAGE as usize];
        foam.file("pagemap-7", place(0x40_0000).0)
            .unwrap()
            .write_all_at(&[page(1), page(2)].concat(), place(0x40_0000).1)
            .unwrap();
        foam.file("pagemap-7", place(high).0)
            .unwrap()
            .write_all_at(&page(3), place(high).1)
            .unwrap();
        assert_eq!(
            data_ranges(&images.join(DIR).join("pagemap-7")).unwrap(),
            vec![(0x40_0000, 0x40_2000), (high, high + PAGE)]
        );
        // The heap is lazy, the stack page is not: only the stack goes into the pages file.
        let present = BTreeMap::from([(
            "pagemap-7".to_owned(),
            vec![
                entry(0x40_0000, 2, PE_PRESENT | PE_LAZY),
                entry(high, 1, PE_PRESENT),
            ],
        )]);
        write_restore_images(&images.join(DIR), images, &present).unwrap();
        let pages = std::fs::read(images.join("pages-1.img")).unwrap();
        assert_eq!(pages.len(), 3 * PAGE as usize);
        assert!(pages[..2 * PAGE as usize].iter().all(|&b| b == 0));
        assert!(pages[2 * PAGE as usize..].iter().all(|&b| b == 3));
        assert_eq!(check(images).unwrap(), 3 * PAGE);
        let (files, extents) = process_extents(images, 7, &present["pagemap-7"])
            .unwrap()
            .unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(extents[0].data, Some((0, 0x40_0000)));
        assert!(extents[0].lazy && !extents[1].lazy);
        assert_eq!(extents[1].data, Some((1, place(high).1)));
        assert_eq!(process_extents(images, 8, &[]).unwrap(), None);
        // A pagemap that never got a page has no directory, and no data.
        assert_eq!(
            data_ranges(&images.join(DIR).join("pagemap-8")).unwrap(),
            vec![]
        );
        // Eager: the lazy pages are copied in too.
        assert_eq!(fill_pages_files(images).unwrap(), 2 * PAGE);
        let pages = std::fs::read(images.join("pages-1.img")).unwrap();
        assert_eq!(pages, [page(1), page(2), page(3)].concat());
        // A page punched out but still listed: the check says which.
        foam.punch("pagemap-7", 0x40_1000, 0x40_2000).unwrap();
        let err = check(images).unwrap_err().to_string();
        assert!(
            err.contains("1 pages from 0x401000 are listed but not stored"),
            "{err}"
        );
        // A page stored but not listed (stale): so does it.
        foam.file("pagemap-7", 0)
            .unwrap()
            .write_all_at(&page(9), 0x40_1000)
            .unwrap();
        foam.file("pagemap-7", 0)
            .unwrap()
            .write_all_at(&page(9), 0x50_0000)
            .unwrap();
        let err = check(images).unwrap_err().to_string();
        assert!(
            err.contains("1 pages from 0x500000 are stored but not listed"),
            "{err}"
        );
        // A FOAM directory without its pagemap.
        foam.remove("pagemap-7").unwrap();
        foam.file("pagemap-9", 0).unwrap();
        let err = check(images).unwrap_err().to_string();
        assert!(err.contains("pagemap-9 has no pagemap image"), "{err}");
    }
}
