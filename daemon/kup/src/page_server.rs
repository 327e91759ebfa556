//! CRIU's page-server protocol (criu/page-xfer.c), served by kup into FOAM ([`crate::foam`]): a
//! pre-copy round or a final dump sends a unit's pages to kup instead of writing CRIU's pages
//! images, and kup writes each page at its address in the unit's FOAM files.
//!
//! The protocol: CRIU sends 32-byte headers (`u32 cmd`, padding, `u64 nr_pages`, `u64 vaddr`,
//! `u64 dst_id`, native endian), the page data after each `ADD_F` whose flags say `PE_PRESENT`.
//! `OPEN2` selects a pagemap (`dst_id` = id << 8 | type: 1 a process, 2 a shared-memory object)
//! and is answered with one byte, "a parent image exists"; `PARENT` asks the same and gets an
//! `i32`; `ADD_F` with `PE_PARENT` says the pages did not change since the parent (CRIU's dirty
//! tracking); `CLOSE`/`FORCE_CLOSE` ends the run and is answered with an `i32` status that CRIU
//! returns as its own. kup passes CRIU one end of a socket pair (`criu_opts.ps.fd`).
//!
//! kup's answers make FOAM the parent: a pagemap has one when the last round completed and had
//! it. Pages left in the parent must be in FOAM (else the run fails: status -1, CRIU fails the
//! dump and resumes the unit); pages the process no longer has are punched out at the end of the
//! run, and the files are then checked against the pages the run says the process has (their data
//! extents, `SEEK_DATA`): FOAM is consistent after every round. A run that fails leaves FOAM untrusted: the next one gets no parent and copies everything
//! (a CRIU that died after it reset the dirty bits must not leave stale pages behind).
//! [`Header::parse`], [`Header::encode`], [`pagemap_name`] and [`resolve_round`] are pure;
//! [`Memory::serve`] does the I/O.

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::criu_image::{self, Entry, PE_LAZY, PE_PARENT, PE_PRESENT, Pagemap};
use crate::foam::{self, Foam, FoamError};

/// Size of a protocol header.
pub const HEADER: usize = 32;
pub const PS_IOV_ADD: u32 = 1;
pub const PS_IOV_HOLE: u32 = 2;
pub const PS_IOV_OPEN: u32 = 3;
pub const PS_IOV_OPEN2: u32 = 4;
pub const PS_IOV_PARENT: u32 = 5;
pub const PS_IOV_ADD_F: u32 = 6;
pub const PS_IOV_GET: u32 = 7;
pub const PS_IOV_CLOSE: u32 = 0x1023;
pub const PS_IOV_FORCE_CLOSE: u32 = 0x1024;
const PS_CMD_BITS: u32 = 16;
const PAGE: u64 = 4096;

/// Why a run of the page server failed.
#[derive(Debug, thiserror::Error)]
pub enum PageServerError {
    #[error("CRIU's page-server stream: {0}")]
    Protocol(String),
    #[error("the page-server connection to CRIU: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Foam(#[from] FoamError),
}

/// One protocol header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The command (low 16 bits of CRIU's `cmd`).
    pub cmd: u32,
    /// `PE_*` flags (high 16 bits of CRIU's `cmd`, for `ADD_F`).
    pub flags: u32,
    pub nr_pages: u64,
    pub vaddr: u64,
    pub dst_id: u64,
}

impl Header {
    /// Decodes a header as CRIU writes it (`struct page_server_iov`).
    pub fn parse(b: &[u8; HEADER]) -> Self {
        let u64_at = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[at..at + 8]);
            u64::from_ne_bytes(w)
        };
        let mut c = [0u8; 4];
        c.copy_from_slice(&b[0..4]);
        let raw = u32::from_ne_bytes(c);
        Self {
            cmd: raw & ((1 << PS_CMD_BITS) - 1),
            flags: raw >> PS_CMD_BITS,
            nr_pages: u64_at(8),
            vaddr: u64_at(16),
            dst_id: u64_at(24),
        }
    }

    /// Encodes a header (what CRIU sends; for tests and clients).
    pub fn encode(&self) -> [u8; HEADER] {
        let mut b = [0u8; HEADER];
        b[0..4].copy_from_slice(&((self.flags << PS_CMD_BITS) | self.cmd).to_ne_bytes());
        b[8..16].copy_from_slice(&self.nr_pages.to_ne_bytes());
        b[16..24].copy_from_slice(&self.vaddr.to_ne_bytes());
        b[24..32].copy_from_slice(&self.dst_id.to_ne_bytes());
        b
    }
}

/// The pagemap a `dst_id` stands for, named like its image without `.img` (`pagemap-PID`,
/// `pagemap-shmem-ID`); older CRIUs' type numbers included (criu/page-xfer.c, `decode_pm`).
pub fn pagemap_name(dst_id: u64) -> Result<String, String> {
    let id = dst_id >> 8;
    match dst_id & 0xff {
        1 | 10 | 11 | 16 | 17 => Ok(format!("pagemap-{id}")),
        2 | 27 | 28 | 29 | 32 | 33 | 34 => Ok(format!("pagemap-shmem-{id}")),
        t => Err(format!("unknown pagemap type {t} in dst_id {dst_id:#x}")),
    }
}

/// The pages of one pagemap after a run: `entries` as CRIU sent them (present or left in the
/// parent), resolved against `parent` (the pages FOAM held before, all present). Every page is
/// present in the result, lazy where CRIU or the parent said so. Fails when CRIU left pages to a
/// parent that does not have them.
pub fn resolve_round(entries: &[Entry], parent: Option<&[Entry]>) -> Result<Vec<Entry>, String> {
    let parent_extents = parent.map(|p| criu_image::locate(p, 0, &[]));
    let present_pages: u64 = entries
        .iter()
        .filter(|e| e.flags & PE_PRESENT != 0)
        .map(|e| e.nr_pages)
        .sum();
    criu_image::check_pagemaps(
        &Pagemap {
            pages_id: 0,
            entries: entries.to_vec(),
        },
        present_pages * PAGE,
        parent_extents.as_deref(),
    )?;
    // Each of CRIU's entries lies inside one VMA (CRIU's restore and kup's lazy-pages server split
    // nothing else): the pieces the parent's laziness cuts it into are joined again within it,
    // never across two of CRIU's entries.
    let parent_extents = parent_extents.unwrap_or_default();
    let mut out: Vec<Entry> = Vec::with_capacity(entries.len());
    for e in entries {
        let first = out.len();
        for p in criu_image::with_parent_laziness(std::slice::from_ref(e), &parent_extents) {
            let flags = PE_PRESENT | (p.flags & PE_LAZY);
            let joined = out.len() > first;
            match out.last_mut() {
                Some(l) if joined && l.flags == flags => l.nr_pages += p.nr_pages,
                _ => out.push(Entry {
                    vaddr: p.vaddr,
                    nr_pages: p.nr_pages,
                    flags,
                }),
            }
        }
    }
    Ok(out)
}

/// What one run brought.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunStats {
    /// Bytes of pages CRIU sent.
    pub bytes: u64,
    /// Bytes of pages it left in FOAM (unchanged since the last round).
    pub parent_bytes: u64,
    /// Pagemaps (processes and shared-memory objects).
    pub pagemaps: usize,
}

/// A unit's memory in FOAM across its pre-copy rounds and final dump.
#[derive(Debug)]
pub struct Memory {
    foam: Foam,
    /// Each pagemap's pages as of the last completed run (all present).
    present: BTreeMap<String, Vec<Entry>>,
    /// Whether the last run completed (its pages can be a parent).
    trusted: bool,
    /// The processes' memory is kept in place (PPP): their pages are read off the socket and
    /// dropped, only the pagemaps are kept (shared-memory objects are stored as usual), except
    /// the pages of the kernel's special mappings (the vDSO), which the kernel does not keep.
    in_place: bool,
    /// Memory kept in place: each process's special mappings, read once per run.
    specials: BTreeMap<String, Vec<(u64, u64)>>,
    /// Memory kept in place: where each stored special page is in its pagemap's
    /// [`foam::SPECIAL_DATA`] (page address -> offset), across the runs.
    special_pages: BTreeMap<String, BTreeMap<u64, u64>>,
    /// Where they come from: `/proc/PID/maps` ([`special_ranges`]); tests give their own.
    special_ranges: fn(i32) -> Vec<(u64, u64)>,
}

impl Memory {
    /// An empty FOAM store at `root`.
    pub fn create(root: &Path) -> Result<Self, FoamError> {
        Ok(Self {
            foam: Foam::create(root)?,
            present: BTreeMap::new(),
            trusted: false,
            in_place: false,
            specials: BTreeMap::new(),
            special_pages: BTreeMap::new(),
            special_ranges,
        })
    }

    /// A store for a unit whose processes' memory the kernel keeps in place (the luo backend's
    /// PPP): CRIU's runs give it the pagemaps (which pages each process has, lazy or not) and
    /// nothing of the processes' pages is written; each process's directory gets the
    /// [`foam::IN_PLACE`] marker.
    pub fn create_in_place(root: &Path) -> Result<Self, FoamError> {
        Ok(Self {
            in_place: true,
            ..Self::create(root)?
        })
    }

    /// Whether pagemap `name`'s pages are kept in place rather than stored.
    fn kept_in_place(&self, name: &str) -> bool {
        self.in_place && !name.starts_with("pagemap-shmem-")
    }

    fn has_parent(&self, name: &str) -> bool {
        self.trusted && self.present.contains_key(name)
    }

    /// Serves one CRIU run (a pre-dump or a dump) on `sock`, until CRIU closes it. With `images`
    /// (the final dump), CRIU's pagemap and pages files for the restore are written there before
    /// CRIU is told the run succeeded. After a failed run the store is no parent, and a failed
    /// pre-copy round empties it (see the module's notes).
    pub fn serve(
        &mut self,
        sock: OwnedFd,
        images: Option<&Path>,
    ) -> Result<RunStats, PageServerError> {
        let mut sock = UnixStream::from(sock);
        let served = self.run(&mut sock, images);
        if served.is_err() {
            self.trusted = false;
            self.present.clear();
            // A pre-copy round starts over. The final dump's files stay: nothing restores from
            // them unless they pass the image check.
            if images.is_none() {
                let root = self.foam.root().to_path_buf();
                self.foam = Foam::create(&root)?;
            }
        }
        served
    }

    fn run(
        &mut self,
        sock: &mut UnixStream,
        images: Option<&Path>,
    ) -> Result<RunStats, PageServerError> {
        let mut stats = RunStats::default();
        let mut round: BTreeMap<String, Vec<Entry>> = BTreeMap::new();
        let mut told_parent: HashSet<String> = HashSet::new();
        let mut current: Option<(u64, String)> = None;
        let (pipe_r, pipe_w) = nix::unistd::pipe().map_err(std::io::Error::from)?;
        // Bigger pipe, fewer splices (the default holds 16 pages); best effort.
        let _ = nix::fcntl::fcntl(&pipe_w, nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20));
        loop {
            let mut b = [0u8; HEADER];
            if let Err(e) = sock.read_exact(&mut b) {
                return Err(if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    PageServerError::Protocol(
                        "CRIU closed the connection before it finished".into(),
                    )
                } else {
                    e.into()
                });
            }
            let h = Header::parse(&b);
            let mut select = |dst_id: u64,
                              current: &mut Option<(u64, String)>|
             -> Result<String, PageServerError> {
                let name = pagemap_name(dst_id).map_err(PageServerError::Protocol)?;
                round.entry(name.clone()).or_default();
                *current = Some((dst_id, name.clone()));
                Ok(name)
            };
            match h.cmd {
                PS_IOV_OPEN => {
                    select(h.dst_id, &mut current)?;
                }
                PS_IOV_OPEN2 => {
                    let name = select(h.dst_id, &mut current)?;
                    let parent = self.has_parent(&name);
                    if parent {
                        told_parent.insert(name);
                    }
                    sock.write_all(&[u8::from(parent)])?;
                }
                PS_IOV_PARENT => {
                    let name = pagemap_name(h.dst_id).map_err(PageServerError::Protocol)?;
                    let parent = self.has_parent(&name);
                    if parent {
                        told_parent.insert(name);
                    }
                    sock.write_all(&i32::from(parent).to_ne_bytes())?;
                }
                PS_IOV_ADD_F | PS_IOV_ADD | PS_IOV_HOLE => {
                    let flags = match h.cmd {
                        PS_IOV_ADD_F => h.flags,
                        PS_IOV_ADD => PE_PRESENT,
                        _ => PE_PARENT,
                    };
                    let name = match &current {
                        Some((id, name)) if *id == h.dst_id => name.clone(),
                        _ => select(h.dst_id, &mut current)?,
                    };
                    if h.vaddr % PAGE != 0 || h.nr_pages == 0 {
                        return Err(PageServerError::Protocol(format!(
                            "{name}: {} pages at {:#x} (not a page-aligned range)",
                            h.nr_pages, h.vaddr
                        )));
                    }
                    let entries = round.entry(name.clone()).or_default();
                    if let Some(l) = entries.last() {
                        if l.vaddr + l.nr_pages * PAGE > h.vaddr {
                            return Err(PageServerError::Protocol(format!(
                                "{name}: pages at {:#x} come after pages up to {:#x}",
                                h.vaddr,
                                l.vaddr + l.nr_pages * PAGE
                            )));
                        }
                    }
                    let len = h.nr_pages * PAGE;
                    if flags & PE_PRESENT != 0 {
                        self.receive(sock, &pipe_r, &pipe_w, &name, h.vaddr, len)?;
                        stats.bytes += len;
                    } else if flags & PE_PARENT != 0 {
                        if !told_parent.contains(&name) {
                            return Err(PageServerError::Protocol(format!(
                                "{name}: CRIU left {} pages at {:#x} to a parent kup did not offer",
                                h.nr_pages, h.vaddr
                            )));
                        }
                        stats.parent_bytes += len;
                    } else {
                        return Err(PageServerError::Protocol(format!(
                            "{name}: {} pages at {:#x} neither sent nor in the parent (flags {:#x})",
                            h.nr_pages, h.vaddr, flags
                        )));
                    }
                    round.entry(name).or_default().push(Entry {
                        vaddr: h.vaddr,
                        nr_pages: h.nr_pages,
                        flags,
                    });
                }
                PS_IOV_CLOSE | PS_IOV_FORCE_CLOSE => {
                    let done = self.finish(round, images);
                    let status: i32 = if done.is_ok() { 0 } else { -1 };
                    // CRIU returns this status as its own: -1 fails the dump (and resumes the unit).
                    let answered = sock.write_all(&status.to_ne_bytes());
                    stats.pagemaps = self.present.len();
                    done?;
                    answered?;
                    return Ok(stats);
                }
                PS_IOV_GET => {
                    return Err(PageServerError::Protocol(
                        "CRIU asked for pages (PS_IOV_GET): kup serves lazy pages itself".into(),
                    ));
                }
                other => {
                    return Err(PageServerError::Protocol(format!(
                        "unknown command {other:#x}"
                    )));
                }
            }
        }
    }

    /// Moves `len` bytes of page data from the socket to `name`'s FOAM file at `vaddr`, through a
    /// pipe (`splice`: the data does not pass through kup's memory).
    fn receive(
        &mut self,
        sock: &UnixStream,
        pipe_r: &OwnedFd,
        pipe_w: &OwnedFd,
        name: &str,
        vaddr: u64,
        len: u64,
    ) -> Result<(), PageServerError> {
        if self.kept_in_place(name) {
            // The kernel keeps the process's anonymous pages: only those of its special mappings
            // are stored ([`foam::merge_into_whole`] adds them to the kept memory at the restore).
            let pid = name
                .strip_prefix("pagemap-")
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            let read = self.special_ranges;
            let specials = self
                .specials
                .entry(name.to_owned())
                .or_insert_with(|| read(pid))
                .clone();
            let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
            for (a, b, store) in split_by(vaddr, vaddr + len, &specials) {
                if store {
                    self.store_special(sock, (pipe_r, pipe_w), name, a, b - a)?;
                } else {
                    pump(sock, (pipe_r, pipe_w), (name, a), b - a, &null, None)?;
                }
            }
            return Ok(());
        }
        self.store(sock, (pipe_r, pipe_w), name, vaddr, len)
    }

    /// Memory kept in place: moves the pages at `vaddr..vaddr + len` of a special mapping into
    /// `name`'s dense [`foam::SPECIAL_DATA`] (a page sent again overwrites its earlier copy), not
    /// into a sparse slice file: LUO would allocate every hole of that.
    fn store_special(
        &mut self,
        sock: &UnixStream,
        pipe: (&OwnedFd, &OwnedFd),
        name: &str,
        vaddr: u64,
        len: u64,
    ) -> Result<(), PageServerError> {
        let dir = self.foam.root().join(name);
        std::fs::create_dir_all(&dir)?;
        let data = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(foam::SPECIAL_DATA))?;
        let pages = self.special_pages.entry(name.to_owned()).or_default();
        for at in (vaddr..vaddr + len).step_by(PAGE as usize) {
            let next = pages.len() as u64 * PAGE;
            let mut off = *pages.entry(at).or_insert(next) as nix::libc::loff_t;
            pump(sock, pipe, (name, at), PAGE, &data, Some(&mut off))?;
        }
        Ok(())
    }

    /// Moves `len` bytes of page data from the socket into `name`'s FOAM at `vaddr`.
    fn store(
        &mut self,
        sock: &UnixStream,
        pipe: (&OwnedFd, &OwnedFd),
        name: &str,
        vaddr: u64,
        len: u64,
    ) -> Result<(), PageServerError> {
        for (slice, offset, part) in foam::pieces(vaddr, vaddr + len) {
            let file = self.foam.file(name, slice)?;
            let mut off = offset as nix::libc::loff_t;
            pump(sock, pipe, (name, vaddr), part, file, Some(&mut off))?;
        }
        Ok(())
    }

    /// Ends a run: resolves each pagemap against the last one, punches out what is gone, writes
    /// the restore's images (the final dump).
    fn finish(
        &mut self,
        round: BTreeMap<String, Vec<Entry>>,
        images: Option<&Path>,
    ) -> Result<(), PageServerError> {
        self.specials.clear();
        let mut next = BTreeMap::new();
        for (name, entries) in &round {
            let parent = self.present.get(name).map(Vec::as_slice);
            let resolved = resolve_round(entries, parent)
                .map_err(|reason| PageServerError::Protocol(format!("{name}: {reason}")))?;
            next.insert(name.clone(), resolved);
        }
        for (name, before) in &self.present {
            if self.kept_in_place(name) {
                // Kept in place: nothing stored to punch; a process gone leaves.
                if !next.contains_key(name) {
                    self.foam.remove(name)?;
                    self.special_pages.remove(name);
                }
                continue;
            }
            match next.get(name) {
                None => self.foam.remove(name)?,
                Some(now) => {
                    let gone =
                        foam::subtract(&foam::entry_ranges(before), &foam::entry_ranges(now));
                    for (a, b) in gone {
                        self.foam.punch(name, a, b)?;
                    }
                }
            }
        }
        // The store after this run holds exactly its pages: checked after every round, so a round
        // whose writes did not land is never the parent of the next one.
        for (name, entries) in &next {
            let dir = self.foam.root().join(name);
            if self.kept_in_place(name) {
                let map = foam::render_special_map(
                    self.special_pages.get(name).unwrap_or(&BTreeMap::new()),
                );
                std::fs::create_dir_all(&dir)
                    .and_then(|()| std::fs::write(dir.join(foam::IN_PLACE), b""))
                    .and_then(|()| std::fs::write(dir.join(foam::SPECIAL_MAP), map))
                    .map_err(PageServerError::Io)?;
                continue;
            }
            let want = foam::entry_ranges(entries);
            let have = foam::data_ranges(&dir)?;
            if want != have {
                let (missing, stale) = (foam::subtract(&want, &have), foam::subtract(&have, &want));
                return Err(FoamError::Inconsistent {
                    path: dir.display().to_string(),
                    reason: format!(
                        "after the run, {} pages are missing and {} are stale",
                        missing.iter().map(|(a, b)| (b - a) / PAGE).sum::<u64>(),
                        stale.iter().map(|(a, b)| (b - a) / PAGE).sum::<u64>()
                    ),
                }
                .into());
            }
        }
        self.present = next;
        self.trusted = true;
        if let Some(images) = images {
            self.foam.sync()?;
            foam::write_restore_images(self.foam.root(), images, &self.present)?;
        }
        Ok(())
    }
}

/// The kernel's special mappings of process `pid` (`[vdso]` and the like: bracketed names other
/// than `[heap]`, `[stack]` and `[anon:...]`), from `/proc/PID/maps`: CRIU dumps the vDSO's pages,
/// and they are not the process's anonymous pages that the kernel keeps in place.
pub fn special_ranges(pid: i32) -> Vec<(u64, u64)> {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map(|maps| parse_special_ranges(&maps))
        .unwrap_or_default()
}

/// [`special_ranges`] of a `/proc/PID/maps` text.
pub fn parse_special_ranges(maps: &str) -> Vec<(u64, u64)> {
    maps.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let range = w.next()?;
            let name = w.nth(4)?;
            let special = name.starts_with('[')
                && !matches!(name, "[heap]" | "[stack]")
                && !name.starts_with("[anon:")
                && !name.starts_with("[stack:");
            let (a, b) = range.split_once('-')?;
            let range = (
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            );
            special.then_some(range)
        })
        .collect()
}

/// `start..end` cut along `ranges` (sorted, disjoint): `(a, b, inside)` pieces, in order.
pub fn split_by(start: u64, end: u64, ranges: &[(u64, u64)]) -> Vec<(u64, u64, bool)> {
    let mut out = Vec::new();
    let mut at = start;
    for &(a, b) in ranges.iter().filter(|r| r.1 > start && r.0 < end) {
        if a > at {
            out.push((at, a, false));
        }
        out.push((a.max(at), b.min(end), true));
        at = b.min(end);
    }
    if at < end {
        out.push((at, end, false));
    }
    out
}

/// Moves `len` bytes of page data (of pagemap `name`, the pages at `vaddr`) from the socket to
/// `out` at `off` (its own position when `None`), through `pipe` (`splice`: the data does not
/// pass through kup's memory). Memory kept in place goes to /dev/null.
fn pump(
    sock: &UnixStream,
    (pipe_r, pipe_w): (&OwnedFd, &OwnedFd),
    (name, vaddr): (&str, u64),
    len: u64,
    out: &std::fs::File,
    mut off: Option<&mut nix::libc::loff_t>,
) -> Result<(), PageServerError> {
    use nix::fcntl::{SpliceFFlags, splice};
    let mut left = len as usize;
    while left > 0 {
        let n = splice(
            sock.as_fd(),
            None,
            pipe_w,
            None,
            left.min(1 << 20),
            SpliceFFlags::SPLICE_F_MOVE,
        )
        .map_err(std::io::Error::from)?;
        if n == 0 {
            return Err(PageServerError::Protocol(format!(
                "{name}: CRIU closed the connection in the middle of the pages at {vaddr:#x}"
            )));
        }
        let mut in_pipe = n;
        while in_pipe > 0 {
            in_pipe -= splice(
                pipe_r,
                None,
                out,
                off.as_deref_mut(),
                in_pipe,
                SpliceFFlags::SPLICE_F_MOVE,
            )
            .map_err(std::io::Error::from)?;
        }
        left -= n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn header(cmd: u32, flags: u32, nr_pages: u64, vaddr: u64, dst_id: u64) -> [u8; HEADER] {
        Header {
            cmd,
            flags,
            nr_pages,
            vaddr,
            dst_id,
        }
        .encode()
    }

    #[test]
    fn headers_round_trip_and_name_their_pagemap() {
        let h = Header {
            cmd: PS_IOV_ADD_F,
            flags: PE_PRESENT | PE_LAZY,
            nr_pages: 3,
            vaddr: 0x7f00_0000_1000,
            dst_id: (1234 << 8) | 1,
        };
        let b = h.encode();
        // CRIU's layout: cmd (flags << 16 | cmd), 4 bytes of padding, then three u64.
        assert_eq!(
            u32::from_ne_bytes(b[0..4].try_into().unwrap()),
            ((PE_PRESENT | PE_LAZY) << 16) | 6
        );
        assert_eq!(Header::parse(&b), h);
        assert_eq!(pagemap_name(h.dst_id).unwrap(), "pagemap-1234");
        assert_eq!(pagemap_name((9 << 8) | 2).unwrap(), "pagemap-shmem-9");
        assert_eq!(pagemap_name((9 << 8) | 11).unwrap(), "pagemap-9");
        assert!(pagemap_name((9 << 8) | 5).is_err());
    }

    fn e(vaddr: u64, nr_pages: u64, flags: u32) -> Entry {
        Entry {
            vaddr,
            nr_pages,
            flags,
        }
    }

    #[test]
    fn a_round_resolves_parent_pages_with_their_laziness_and_refuses_missing_ones() {
        let parent = [e(0x1000, 4, PE_PRESENT | PE_LAZY), e(0x9000, 1, PE_PRESENT)];
        let round = [
            e(0x1000, 1, PE_PARENT),
            e(0x2000, 1, PE_PRESENT | PE_LAZY),
            e(0x3000, 2, PE_PARENT),
            e(0x9000, 1, PE_PARENT),
        ];
        // Pages left in the parent keep its laziness; CRIU's entries (one VMA each) stay apart.
        assert_eq!(
            resolve_round(&round, Some(&parent)).unwrap(),
            vec![
                e(0x1000, 1, PE_PRESENT | PE_LAZY),
                e(0x2000, 1, PE_PRESENT | PE_LAZY),
                e(0x3000, 2, PE_PRESENT | PE_LAZY),
                e(0x9000, 1, PE_PRESENT)
            ]
        );
        // One entry of CRIU's over a parent cut in two (a lazy and a non-lazy part) stays cut
        // there only.
        let parent = [e(0x1000, 2, PE_PRESENT | PE_LAZY), e(0x3000, 2, PE_PRESENT)];
        assert_eq!(
            resolve_round(&[e(0x1000, 4, PE_PARENT)], Some(&parent)).unwrap(),
            vec![e(0x1000, 2, PE_PRESENT | PE_LAZY), e(0x3000, 2, PE_PRESENT)]
        );
        let parent = [
            e(0x1000, 2, PE_PRESENT | PE_LAZY),
            e(0x3000, 2, PE_PRESENT | PE_LAZY),
        ];
        assert_eq!(
            resolve_round(&[e(0x1000, 4, PE_PARENT)], Some(&parent)).unwrap(),
            vec![e(0x1000, 4, PE_PRESENT | PE_LAZY)]
        );
        let err = resolve_round(&[e(0x5000, 2, PE_PARENT)], Some(&parent)).unwrap_err();
        assert!(err.contains("which has only 0 of them"), "{err}");
        let err = resolve_round(&[e(0x1000, 1, PE_PARENT)], None).unwrap_err();
        assert!(err.contains("there is no parent"), "{err}");
    }

    /// A fake CRIU: a pre-dump of two processes, then a dump of one of them with dirty tracking.
    #[test]
    fn rounds_write_pages_in_place_punch_what_is_gone_and_write_the_restore_images() {
        let tmp = tempfile::tempdir().unwrap();
        // As in an update: FOAM inside the unit's image directory, where the final dump goes.
        let images = tmp.path().to_path_buf();
        let root = images.join(foam::DIR);
        let mut memory = Memory::create(&root).unwrap();
        let page = |b: u8, n: usize| vec![b; n * PAGE as usize];
        let (p1, p2) = ((7u64 << 8) | 1, (8u64 << 8) | 1);

        // Round 1: no parent; process 7 has 3 lazy pages and a stack page, process 8 one page.
        let (mut criu, kup) = UnixStream::pair().unwrap();
        let client = std::thread::spawn(move || {
            let mut b = [0u8; 4];
            criu.write_all(&header(PS_IOV_PARENT, 0, 0, 0, p1)).unwrap();
            criu.read_exact(&mut b).unwrap();
            assert_eq!(i32::from_ne_bytes(b), 0);
            let mut one = [0u8; 1];
            criu.write_all(&header(PS_IOV_OPEN2, 0, 0, 0, p1)).unwrap();
            criu.read_exact(&mut one).unwrap();
            assert_eq!(one[0], 0);
            criu.write_all(&header(PS_IOV_ADD_F, PE_PRESENT | PE_LAZY, 3, 0x10_000, p1))
                .unwrap();
            criu.write_all(&page(1, 3)).unwrap();
            criu.write_all(&header(PS_IOV_ADD_F, PE_PRESENT, 1, 0x7ffc_0000_0000, p1))
                .unwrap();
            criu.write_all(&page(5, 1)).unwrap();
            criu.write_all(&header(PS_IOV_OPEN2, 0, 0, 0, p2)).unwrap();
            criu.read_exact(&mut one).unwrap();
            criu.write_all(&header(PS_IOV_ADD_F, PE_PRESENT, 1, 0x20_000, p2))
                .unwrap();
            criu.write_all(&page(8, 1)).unwrap();
            // A shared-memory object with no page in memory: opened, nothing sent.
            criu.write_all(&header(PS_IOV_OPEN2, 0, 0, 0, (3 << 8) | 2))
                .unwrap();
            criu.read_exact(&mut one).unwrap();
            criu.write_all(&header(PS_IOV_FORCE_CLOSE, 0, 0, 0, 0))
                .unwrap();
            criu.read_exact(&mut b).unwrap();
            i32::from_ne_bytes(b)
        });
        let stats = memory.serve(kup.into(), None).unwrap();
        assert_eq!(client.join().unwrap(), 0);
        assert_eq!(stats.bytes, 5 * PAGE);
        assert_eq!(stats.pagemaps, 3);

        // Final dump: process 8 is gone; process 7 dirtied its middle page, unmapped its last
        // heap page, the rest is in the parent.
        let (mut criu, kup) = UnixStream::pair().unwrap();
        let client = std::thread::spawn(move || {
            let mut one = [0u8; 1];
            criu.write_all(&header(PS_IOV_OPEN2, 0, 0, 0, p1)).unwrap();
            criu.read_exact(&mut one).unwrap();
            assert_eq!(one[0], 1, "FOAM is the parent after a good round");
            criu.write_all(&header(PS_IOV_ADD_F, PE_PARENT, 1, 0x10_000, p1))
                .unwrap();
            criu.write_all(&header(PS_IOV_ADD_F, PE_PRESENT | PE_LAZY, 1, 0x11_000, p1))
                .unwrap();
            criu.write_all(&page(2, 1)).unwrap();
            criu.write_all(&header(PS_IOV_ADD_F, PE_PARENT, 1, 0x7ffc_0000_0000, p1))
                .unwrap();
            criu.write_all(&header(PS_IOV_CLOSE, 0, 0, 0, 0)).unwrap();
            let mut b = [0u8; 4];
            criu.read_exact(&mut b).unwrap();
            i32::from_ne_bytes(b)
        });
        let stats = memory.serve(kup.into(), Some(&images)).unwrap();
        assert_eq!(client.join().unwrap(), 0);
        assert_eq!((stats.bytes, stats.parent_bytes), (PAGE, 2 * PAGE));
        assert!(
            !root.join("pagemap-8").exists(),
            "a gone process leaves FOAM"
        );
        assert_eq!(
            foam::data_ranges(&root.join("pagemap-7")).unwrap(),
            vec![(0x10_000, 0x12_000), (0x7ffc_0000_0000, 0x7ffc_0000_1000)]
        );
        // CRIU's images for the restore: one pagemap, every page present, the stack not lazy.
        let pm = criu_image::parse(&std::fs::read(images.join("pagemap-7.img")).unwrap()).unwrap();
        assert_eq!(
            pm.entries,
            vec![
                e(0x10_000, 1, PE_PRESENT | PE_LAZY),
                e(0x11_000, 1, PE_PRESENT | PE_LAZY),
                e(0x7ffc_0000_0000, 1, PE_PRESENT)
            ]
        );
        std::fs::write(images.join("inventory.img"), b"").unwrap();
        std::fs::write(images.join("pstree.img"), b"").unwrap();
        assert!(criu_image::check(&images).is_ok());
        assert_eq!(foam::fill_pages_files(&images).unwrap(), 2 * PAGE);
        assert_eq!(
            std::fs::read(images.join(format!("pages-{}.img", pm.pages_id))).unwrap(),
            [page(1, 1), page(2, 1), page(5, 1)].concat()
        );

        // A run that claims a parent page FOAM does not have fails with status -1, and the next
        // run gets no parent.
        let (mut criu, kup) = UnixStream::pair().unwrap();
        let client = std::thread::spawn(move || {
            let mut one = [0u8; 1];
            criu.write_all(&header(PS_IOV_OPEN2, 0, 0, 0, p1)).unwrap();
            criu.read_exact(&mut one).unwrap();
            criu.write_all(&header(PS_IOV_ADD_F, PE_PARENT, 4, 0x40_000, p1))
                .unwrap();
            criu.write_all(&header(PS_IOV_CLOSE, 0, 0, 0, 0)).unwrap();
            let mut b = [0u8; 4];
            criu.read_exact(&mut b).unwrap();
            i32::from_ne_bytes(b)
        });
        let err = memory.serve(kup.into(), None).unwrap_err().to_string();
        assert_eq!(client.join().unwrap(), -1);
        assert!(err.contains("which has only 0 of them"), "{err}");
        assert!(!memory.has_parent("pagemap-7"));
        assert!(
            !root.join("pagemap-7").exists(),
            "an untrusted store is emptied"
        );

        // CRIU gone in the middle: an error, no parent next time.
        let (mut criu, kup) = UnixStream::pair().unwrap();
        criu.write_all(&header(PS_IOV_OPEN, 0, 0, 0, p1)).unwrap();
        criu.write_all(&header(PS_IOV_ADD_F, PE_PRESENT, 2, 0x10_000, p1))
            .unwrap();
        criu.write_all(&page(3, 1)).unwrap();
        drop(criu);
        let err = memory.serve(kup.into(), None).unwrap_err().to_string();
        assert!(err.contains("closed the connection"), "{err}");
    }

    #[test]
    fn memory_kept_in_place_is_not_stored_and_comes_back_through_the_whole_file() {
        use std::os::unix::fs::FileExt;
        let tmp = tempfile::tempdir().unwrap();
        let images = tmp.path().to_path_buf();
        let root = images.join(foam::DIR);
        // Without special pages, nothing is merged.
        let none = tempfile::tempdir().unwrap();
        let dir0 = none.path().join(foam::DIR).join("pagemap-9");
        std::fs::create_dir_all(&dir0).unwrap();
        std::fs::write(dir0.join(foam::IN_PLACE), b"").unwrap();
        std::fs::write(dir0.join(foam::SPECIAL_MAP), b"").unwrap();
        std::fs::write(dir0.join(foam::WHOLE), b"").unwrap();
        assert_eq!(foam::merge_into_whole(none.path()).unwrap(), 0);
        let mut memory = Memory::create_in_place(&root).unwrap();
        // The process's vDSO: its pages are stored, not dropped.
        memory.special_ranges = |_| vec![(0x20_000, 0x22_000)];
        let page = |b: u8, n: usize| vec![b; n * PAGE as usize];
        let (p7, shm) = ((7u64 << 8) | 1, (3u64 << 8) | 2);
        // (A memfd takes any address; the test's files are on the host's disk, ext4 stops at 16 TiB.)
        let stack = 0x0e00_0000_0000u64;
        // The pre-copy round: every page sent, none stored for the process; the shared-memory
        // object's page is stored as usual.
        let (mut criu, kup) = UnixStream::pair().unwrap();
        let client = std::thread::spawn(move || {
            let mut one = [0u8; 1];
            criu.write_all(&header(PS_IOV_OPEN2, 0, 0, 0, p7)).unwrap();
            criu.read_exact(&mut one).unwrap();
            criu.write_all(&header(PS_IOV_ADD_F, PE_PRESENT | PE_LAZY, 2, 0x10_000, p7))
                .unwrap();
            criu.write_all(&page(1, 2)).unwrap();
            // The last page of a heap range and the vDSO's two, in one range.
            criu.write_all(&header(PS_IOV_ADD_F, PE_PRESENT, 3, 0x1f_000, p7))
                .unwrap();
            criu.write_all(&[page(3, 1), page(4, 2)].concat()).unwrap();
            criu.write_all(&header(PS_IOV_ADD_F, PE_PRESENT, 1, stack, p7))
                .unwrap();
            criu.write_all(&page(5, 1)).unwrap();
            criu.write_all(&header(PS_IOV_OPEN2, 0, 0, 0, shm)).unwrap();
            criu.read_exact(&mut one).unwrap();
            criu.write_all(&header(PS_IOV_ADD_F, PE_PRESENT, 1, 0, shm))
                .unwrap();
            criu.write_all(&page(9, 1)).unwrap();
            criu.write_all(&header(PS_IOV_CLOSE, 0, 0, 0, 0)).unwrap();
            let mut b = [0u8; 4];
            criu.read_exact(&mut b).unwrap();
            i32::from_ne_bytes(b)
        });
        memory.serve(kup.into(), None).unwrap();
        assert_eq!(client.join().unwrap(), 0);
        // The final dump: one page dirtied, the rest left to the parent.
        let (mut criu, kup) = UnixStream::pair().unwrap();
        let client = std::thread::spawn(move || {
            let mut one = [0u8; 1];
            criu.write_all(&header(PS_IOV_OPEN2, 0, 0, 0, p7)).unwrap();
            criu.read_exact(&mut one).unwrap();
            assert_eq!(one[0], 1, "the pagemaps of the round are the parent");
            criu.write_all(&header(PS_IOV_ADD_F, PE_PARENT, 1, 0x10_000, p7))
                .unwrap();
            criu.write_all(&header(PS_IOV_ADD_F, PE_PRESENT | PE_LAZY, 1, 0x11_000, p7))
                .unwrap();
            criu.write_all(&page(2, 1)).unwrap();
            criu.write_all(&header(PS_IOV_ADD_F, PE_PARENT, 3, 0x1f_000, p7))
                .unwrap();
            criu.write_all(&header(PS_IOV_ADD_F, PE_PARENT, 1, stack, p7))
                .unwrap();
            criu.write_all(&header(PS_IOV_OPEN2, 0, 0, 0, shm)).unwrap();
            criu.read_exact(&mut one).unwrap();
            criu.write_all(&header(PS_IOV_ADD_F, PE_PARENT, 1, 0, shm))
                .unwrap();
            criu.write_all(&header(PS_IOV_CLOSE, 0, 0, 0, 0)).unwrap();
            let mut b = [0u8; 4];
            criu.read_exact(&mut b).unwrap();
            i32::from_ne_bytes(b)
        });
        memory.serve(kup.into(), Some(&images)).unwrap();
        assert_eq!(client.join().unwrap(), 0);
        let dir = root.join("pagemap-7");
        assert!(
            dir.join(foam::IN_PLACE).exists(),
            "the process is marked kept in place"
        );
        assert_eq!(
            foam::data_ranges(&dir).unwrap(),
            vec![],
            "nothing of it in FOAM's sparse files"
        );
        // The vDSO's pages, dense (a sparse file would have LUO allocate its holes).
        assert_eq!(
            std::fs::read_to_string(dir.join(foam::SPECIAL_MAP)).unwrap(),
            "20000 0\n21000 1000\n"
        );
        assert_eq!(
            std::fs::read(dir.join(foam::SPECIAL_DATA)).unwrap(),
            page(4, 2)
        );
        assert_eq!(
            foam::data_ranges(&root.join("pagemap-shmem-3")).unwrap(),
            vec![(0, PAGE)],
            "shared memory is stored"
        );
        // The old kernel's check: the memory is where the process has it.
        foam::check(&images).unwrap();
        // The new kernel hands the memory back: page `vaddr` at offset `vaddr`.
        let whole = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join(foam::WHOLE))
            .unwrap();
        whole
            .write_all_at(&[page(1, 1), page(2, 1)].concat(), 0x10_000)
            .unwrap();
        whole.write_all_at(&page(3, 1), 0x1f_000).unwrap();
        whole.write_all_at(&page(5, 1), stack).unwrap();
        // Another anonymous page CRIU does not restore: harmless.
        whole.write_all_at(&page(7, 1), 0x50_000).unwrap();
        // The restore: the vDSO joins the kept memory.
        assert_eq!(foam::merge_into_whole(&images).unwrap(), 2 * PAGE);
        let mut vdso = vec![0u8; 2 * PAGE as usize];
        whole.read_exact_at(&mut vdso, 0x20_000).unwrap();
        assert_eq!(vdso, page(4, 2));
        foam::check(&images).unwrap();
        // What is not lazy (a heap page, the vDSO, the stack) goes into the pages file for CRIU;
        // the rest stays lazy.
        assert_eq!(foam::fill_in_place(&images).unwrap(), 4 * PAGE);
        let pm = criu_image::parse(&std::fs::read(images.join("pagemap-7.img")).unwrap()).unwrap();
        // Lazy pages take no room in the pages file (`PE_LAZY` alone): it holds the stack only.
        assert_eq!(
            pm.entries,
            vec![
                criu_image::Entry {
                    vaddr: 0x10_000,
                    nr_pages: 1,
                    flags: PE_LAZY
                },
                criu_image::Entry {
                    vaddr: 0x11_000,
                    nr_pages: 1,
                    flags: PE_LAZY
                },
                criu_image::Entry {
                    vaddr: 0x1f_000,
                    nr_pages: 3,
                    flags: PE_PRESENT
                },
                criu_image::Entry {
                    vaddr: stack,
                    nr_pages: 1,
                    flags: PE_PRESENT
                },
            ]
        );
        let pages = std::fs::read(images.join(format!("pages-{}.img", pm.pages_id))).unwrap();
        assert_eq!(pages, [page(3, 1), page(4, 2), page(5, 1)].concat());
        foam::check(&images).unwrap();
        let (files, extents) = foam::process_extents(&images, 7, &pm.entries)
            .unwrap()
            .unwrap();
        assert_eq!(files, vec![dir.join(foam::WHOLE)]);
        assert_eq!(extents[0].data, Some((0, 0x10_000)));
        // A page CRIU lists that the kernel did not hand back fails the check.
        drop(whole);
        let whole = std::fs::File::create(dir.join(foam::WHOLE)).unwrap();
        whole.write_all_at(&page(5, 1), stack).unwrap();
        let err = foam::check(&images).unwrap_err().to_string();
        assert!(err.contains("listed but not stored"), "{err}");
    }

    #[test]
    fn special_mappings_are_the_kernels_and_ranges_split_along_them() {
        let maps = "55d0c8a00000-55d0c8a21000 rw-p 00000000 00:00 0          [heap]\n\
            7fc3a25d5000-7fc3a25d7000 rw-p 00000000 00:00 0 \n\
            7fc3a25d7000-7fc3a25db000 r--p 00000000 00:00 0          [vvar]\n\
            7fc3a25dd000-7fc3a25df000 r-xp 00000000 00:00 0          [vdso]\n\
            7fc3a25df000-7fc3a25e0000 r--p 00000000 fe:20 6642       /usr/lib/ld-linux-x86-64.so.2\n\
            7ffd0984b000-7ffd0986c000 rw-p 00000000 00:00 0          [stack]\n\
            7ffd09900000-7ffd09901000 rw-p 00000000 00:00 0          [anon:glibc: malloc]\n";
        assert_eq!(
            parse_special_ranges(maps),
            vec![
                (0x7fc3_a25d_7000, 0x7fc3_a25d_b000),
                (0x7fc3_a25d_d000, 0x7fc3_a25d_f000)
            ]
        );
        let r = [(0x20, 0x30), (0x40, 0x50)];
        assert_eq!(
            split_by(0x10, 0x45, &r),
            vec![
                (0x10, 0x20, false),
                (0x20, 0x30, true),
                (0x30, 0x40, false),
                (0x40, 0x45, true)
            ]
        );
        assert_eq!(split_by(0x60, 0x70, &r), vec![(0x60, 0x70, false)]);
        assert_eq!(split_by(0x22, 0x28, &r), vec![(0x22, 0x28, true)]);
    }
}
