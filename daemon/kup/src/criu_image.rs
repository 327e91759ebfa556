//! CRIU's image directories, checked before they are trusted: every pagemap (`pagemap-ID.img`,
//! CRIU's images/pagemap.proto) must parse, its pages file must hold exactly the pages it lists as
//! present, and pages it leaves in a parent image (pre-copy rounds) must be there. kup checks a unit's
//! images after its dump, before the kernel switch, and again before the restore (an `fsck` of the
//! image store). The same chain is indexed for kup's lazy-pages server ([`process_pages`]: where each
//! page's data is, which pages are lazy), and a dump restored lazily after pre-copy gets `PE_LAZY`
//! on the pages it left in its parents ([`mark_parent_pages_lazy`]). A dump into FOAM
//! ([`crate::foam`]) is checked and indexed the same way, its data read from FOAM. [`parse`], [`parse_vmas`],
//! [`locate`], [`lazy_ranges`], [`with_parent_laziness`], [`render`] and [`check_pagemaps`] are pure;
//! [`check`], [`process_pages`] and [`mark_parent_pages_lazy`] read the files.

use std::path::Path;

use protobuf::{CodedInputStream, CodedOutputStream};

/// The page is in a parent image.
pub const PE_PARENT: u32 = 1 << 0;
/// The page can be restored lazily (userfaultfd).
pub const PE_LAZY: u32 = 1 << 1;
/// The page is in this image's pages file.
pub const PE_PRESENT: u32 = 1 << 2;

const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
const PAGEMAP_MAGIC: u32 = 0x5608_4025;
const MM_MAGIC: u32 = 0x5749_2820;
const PAGE: u64 = 4096;

/// Why a pagemap image could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path} is not a CRIU pagemap image ({reason}); the images are damaged: dump again")]
    Format { path: String, reason: String },
    #[error(transparent)]
    Foam(#[from] crate::foam::FoamError),
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        source: std::io::Error,
    },
}

/// One pagemap entry: `nr_pages` pages from `vaddr`, with `PE_*` flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub vaddr: u64,
    pub nr_pages: u64,
    pub flags: u32,
}

impl Entry {
    fn end(&self) -> u64 {
        self.vaddr + self.nr_pages * PAGE
    }
}

/// A parsed pagemap image: the head's `pages_id` and the entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pagemap {
    pub pages_id: u32,
    pub entries: Vec<Entry>,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Parses a pagemap image: the two magics, then (u32 size, protobuf message) records, the first a
/// `pagemap_head`, the rest `pagemap_entry` (old images' `in_parent` read as `PE_PARENT`).
pub fn parse(bytes: &[u8]) -> Result<Pagemap, String> {
    if u32_at(bytes, 0) != Some(IMG_COMMON_MAGIC) || u32_at(bytes, 4) != Some(PAGEMAP_MAGIC) {
        return Err("wrong magic".into());
    }
    let mut at = 8;
    let mut records = Vec::new();
    while at < bytes.len() {
        let len = u32_at(bytes, at).ok_or("truncated record size")? as usize;
        let body = bytes.get(at + 4..at + 4 + len).ok_or("truncated record")?;
        records.push(body);
        at += 4 + len;
    }
    let (head, rest) = records.split_first().ok_or("no pagemap head")?;
    let mut pages_id = 0;
    fields(head, |n, s| {
        if n == 1 {
            pages_id = s.read_uint32()?;
            Ok(true)
        } else {
            Ok(false)
        }
    })?;
    let mut entries = Vec::with_capacity(rest.len());
    for r in rest {
        let (mut vaddr, mut compat, mut nr, mut flags, mut in_parent) = (0, 0, None, None, false);
        fields(r, |n, s| {
            match n {
                1 => vaddr = s.read_uint64()?,
                2 => compat = s.read_uint32()?,
                3 => in_parent = s.read_bool()?,
                4 => flags = Some(s.read_uint32()?),
                5 => nr = Some(s.read_uint64()?),
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        let flags = match (flags, in_parent) {
            (Some(f), _) => f,
            (None, true) => PE_PARENT,
            (None, false) => PE_PRESENT,
        };
        entries.push(Entry {
            vaddr,
            nr_pages: nr.unwrap_or(u64::from(compat)),
            flags,
        });
    }
    Ok(Pagemap { pages_id, entries })
}

/// Calls `f(field number, stream)` for each field; `f` returns false to have it skipped.
fn fields(
    body: &[u8],
    mut f: impl FnMut(u32, &mut CodedInputStream) -> protobuf::Result<bool>,
) -> Result<(), String> {
    let mut s = CodedInputStream::from_bytes(body);
    let step = |s: &mut CodedInputStream,
                f: &mut dyn FnMut(u32, &mut CodedInputStream) -> protobuf::Result<bool>|
     -> protobuf::Result<bool> {
        let Some(tag) = s.read_raw_tag_or_eof()? else {
            return Ok(false);
        };
        let (number, wire) = (tag >> 3, tag & 7);
        if !f(number, s)? {
            let wire = protobuf::rt::WireType::new(wire)
                .ok_or_else(|| protobuf::Error::from(std::io::Error::other("bad wire type")))?;
            s.skip_field(wire)?;
        }
        Ok(true)
    };
    while step(&mut s, &mut f).map_err(|e| e.to_string())? {}
    Ok(())
}

/// Where one range of a process's memory is in an image chain: `start..end` (addresses at dump
/// time), whether CRIU may leave it to a lazy-pages server, and its data: `(layer, offset)` in
/// layer `layer`'s pages file (0 = the final dump, 1 = its parent, ...), `None` when no image holds
/// it (CRIU's remote lazy dumps, never kup's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub end: u64,
    pub lazy: bool,
    pub data: Option<(usize, u64)>,
}

/// The extents `entries` (the pagemap of layer `layer`) make available, resolving `PE_PARENT`
/// ranges through `parent` (the parent layer's extents, sorted): sorted, each with its data's
/// place. Parent pages the parent lacks are missing from the result.
pub fn locate(entries: &[Entry], layer: usize, parent: &[Extent]) -> Vec<Extent> {
    let mut out = Vec::with_capacity(entries.len());
    let mut offset = 0;
    for e in entries {
        if e.flags & PE_PARENT != 0 {
            let from = parent.partition_point(|p| p.end <= e.vaddr);
            for p in parent[from..].iter().take_while(|p| p.start < e.end()) {
                let (a, b) = (p.start.max(e.vaddr), p.end.min(e.end()));
                if a < b {
                    out.push(Extent {
                        start: a,
                        end: b,
                        lazy: p.lazy,
                        data: p.data.map(|(l, o)| (l, o + (a - p.start))),
                    });
                }
            }
        } else {
            let data = (e.flags & PE_PRESENT != 0).then_some((layer, offset));
            if data.is_some() {
                offset += e.nr_pages * PAGE;
            }
            out.push(Extent {
                start: e.vaddr,
                end: e.end(),
                lazy: e.flags & PE_LAZY != 0,
                data,
            });
        }
    }
    out
}

/// Writes a pagemap image in CRIU's current form (flags, `nr_pages` and its 32-bit compat field).
pub fn render(pm: &Pagemap) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
    out.extend_from_slice(&PAGEMAP_MAGIC.to_le_bytes());
    let mut record = |build: &dyn Fn(&mut CodedOutputStream) -> protobuf::Result<()>| {
        let mut body = Vec::new();
        {
            let mut s = CodedOutputStream::vec(&mut body);
            // Writing into a Vec cannot fail.
            let _ = build(&mut s).and_then(|()| s.flush());
        }
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
    };
    record(&|s| s.write_uint32(1, pm.pages_id));
    for e in &pm.entries {
        record(&|s| {
            s.write_uint64(1, e.vaddr)?;
            s.write_uint32(2, u32::try_from(e.nr_pages).unwrap_or(u32::MAX))?;
            s.write_uint32(4, e.flags)?;
            s.write_uint64(5, e.nr_pages)
        });
    }
    out
}

/// `entries` with each `PE_PARENT` entry split along `parent` (the parent's extents) and flagged
/// `PE_LAZY` where the parent's page is lazy (CRIU never marks a stack page lazy, and a parent
/// keeps that). Pages the parent does not have keep their entry unchanged.
pub fn with_parent_laziness(entries: &[Entry], parent: &[Extent]) -> Vec<Entry> {
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        if e.flags & PE_PARENT == 0 {
            out.push(*e);
            continue;
        }
        let mut at = e.vaddr;
        let mut push = |from: u64, to: u64, flags: u32| {
            if from < to {
                out.push(Entry {
                    vaddr: from,
                    nr_pages: (to - from) / PAGE,
                    flags,
                });
            }
        };
        let from = parent.partition_point(|p| p.end <= e.vaddr);
        for p in parent[from..].iter().take_while(|p| p.start < e.end()) {
            let (a, b) = (p.start.max(at), p.end.min(e.end()));
            if a >= b {
                continue;
            }
            push(at, a, e.flags);
            let flags = if p.lazy {
                e.flags | PE_LAZY
            } else {
                e.flags & !PE_LAZY
            };
            push(a, b, flags);
            at = b;
        }
        push(at, e.end(), e.flags);
    }
    // Neighbours with the same flags are one entry again (CRIU's own pagemaps never split a run).
    let mut merged: Vec<Entry> = Vec::with_capacity(out.len());
    for e in out {
        match merged.last_mut() {
            Some(l) if l.flags == e.flags && l.flags & PE_PRESENT == 0 && l.end() == e.vaddr => {
                l.nr_pages += e.nr_pages;
            }
            _ => merged.push(e),
        }
    }
    merged
}

/// Parses CRIU's `mm-ID.img` (images/mm.proto) for the process's VMAs: `(start, end)`, as listed.
pub fn parse_vmas(bytes: &[u8]) -> Result<Vec<(u64, u64)>, String> {
    if u32_at(bytes, 0) != Some(IMG_COMMON_MAGIC) || u32_at(bytes, 4) != Some(MM_MAGIC) {
        return Err("wrong magic".into());
    }
    let len = u32_at(bytes, 8).ok_or("truncated record size")? as usize;
    let body = bytes.get(12..12 + len).ok_or("truncated record")?;
    let mut vmas = Vec::new();
    fields(body, |n, s| {
        if n != 14 {
            return Ok(false);
        }
        let vma = s.read_bytes()?;
        let (mut start, mut end) = (0, 0);
        fields(&vma, |n, s| {
            match n {
                1 => start = s.read_uint64()?,
                2 => end = s.read_uint64()?,
                _ => return Ok(false),
            }
            Ok(true)
        })
        .map_err(|e| protobuf::Error::from(std::io::Error::other(e)))?;
        vmas.push((start, end));
        Ok(true)
    })?;
    Ok(vmas)
}

/// The ranges a lazy-pages server serves for one process: the final pagemap's `PE_LAZY` entries,
/// split where a VMA ends (one `UFFDIO_COPY` stays inside one VMA). Sorted.
pub fn lazy_ranges(entries: &[Entry], vmas: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for e in entries.iter().filter(|e| e.flags & PE_LAZY != 0) {
        let from = vmas.partition_point(|v| v.1 <= e.vaddr);
        for &(s, t) in vmas[from..].iter().take_while(|v| v.0 < e.end()) {
            let (a, b) = (s.max(e.vaddr), t.min(e.end()));
            if a < b {
                out.push((a, b));
            }
        }
    }
    out
}

/// One process's memory in an image chain, indexed once for a lazy-pages server.
#[derive(Debug, Clone)]
pub struct ProcessPages {
    /// Each layer's pages file (0 = the final dump, then its parents).
    pub pages_files: Vec<std::path::PathBuf>,
    /// Where each range's data is ([`locate`] through the chain), sorted.
    pub extents: Vec<Extent>,
    /// What the server must bring in ([`lazy_ranges`]).
    pub lazy: Vec<(u64, u64)>,
}

/// Indexes process `pid`'s memory in the dump in `images` and its `parent` chain.
pub fn process_pages(images: &Path, pid: i32) -> Result<ProcessPages, ImageError> {
    let name = format!("pagemap-{pid}.img");
    let chain = chain(images, &name)?;
    let mut extents = Vec::new();
    for (layer, (_, pm)) in chain.iter().enumerate().rev() {
        extents = locate(&pm.entries, layer, &extents);
    }
    let mm = images.join(format!("mm-{pid}.img"));
    let bytes = std::fs::read(&mm).map_err(|source| ImageError::Io {
        op: "read",
        path: mm.display().to_string(),
        source,
    })?;
    let vmas = parse_vmas(&bytes).map_err(|reason| ImageError::Format {
        path: mm.display().to_string(),
        reason,
    })?;
    let lazy = chain
        .first()
        .map(|(_, pm)| lazy_ranges(&pm.entries, &vmas))
        .unwrap_or_default();
    // A dump into FOAM: the data is at each page's own address there, not in the pages file.
    if let Some((pages_files, extents)) =
        crate::foam::process_extents(images, pid, &chain[0].1.entries)?
    {
        return Ok(ProcessPages {
            pages_files,
            extents,
            lazy,
        });
    }
    Ok(ProcessPages {
        pages_files: chain
            .iter()
            .map(|(dir, pm)| dir.join(format!("pages-{}.img", pm.pages_id)))
            .collect(),
        extents,
        lazy,
    })
}

/// Pagemap `name` in `dir`, then in `dir/parent`, ... while the parent has it (at most 32 deep).
fn chain(dir: &Path, name: &str) -> Result<Vec<(std::path::PathBuf, Pagemap)>, ImageError> {
    let mut out = vec![(dir.to_path_buf(), read_pagemap(&dir.join(name))?)];
    let mut d = dir.join("parent");
    while out.len() < 33 && d.join(name).exists() {
        out.push((d.clone(), read_pagemap(&d.join(name))?));
        d = d.join("parent");
    }
    Ok(out)
}

fn read_pagemap(path: &Path) -> Result<Pagemap, ImageError> {
    let bytes = std::fs::read(path).map_err(|source| ImageError::Io {
        op: "read",
        path: path.display().to_string(),
        source,
    })?;
    parse(&bytes).map_err(|reason| ImageError::Format {
        path: path.display().to_string(),
        reason,
    })
}

/// The extents of pagemap `name` in `dir`, through its `parent` links (layer 0 = `dir`).
fn resolved(dir: &Path, name: &str) -> Result<Vec<Extent>, ImageError> {
    let mut extents = Vec::new();
    for (layer, (_, pm)) in chain(dir, name)?.iter().enumerate().rev() {
        extents = locate(&pm.entries, layer, &extents);
    }
    Ok(extents)
}

/// Rewrites the pagemaps of the dump in `images` so that pages left in parent images are lazy
/// where the parents say so (kup's lazy-pages server reads them through the chain; CRIU's restore
/// skips `PE_LAZY` pages whatever layer holds them). Each pagemap is replaced atomically and only
/// gains flags its parents justify. Returns the number of pages newly marked lazy.
pub fn mark_parent_pages_lazy(images: &Path) -> Result<u64, ImageError> {
    let io = |op, p: &Path| {
        let path = p.display().to_string();
        move |source| ImageError::Io { op, path, source }
    };
    let parent_dir = images.join("parent");
    if !parent_dir.exists() {
        return Ok(0);
    }
    let mut marked = 0;
    for e in std::fs::read_dir(images)
        .map_err(io("list", images))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("pagemap-") && name.ends_with(".img")) {
            continue;
        }
        if !parent_dir.join(&name).exists() {
            continue;
        }
        let mut pm = read_pagemap(&e.path())?;
        let parent = resolved(&parent_dir, &name)?;
        let before = lazy_pages(&pm.entries);
        pm.entries = with_parent_laziness(&pm.entries, &parent);
        marked += lazy_pages(&pm.entries).saturating_sub(before);
        let tmp = images.join(format!("{name}.kup-tmp"));
        std::fs::write(&tmp, render(&pm)).map_err(io("write", &tmp))?;
        std::fs::rename(&tmp, e.path()).map_err(io("replace", &e.path()))?;
    }
    Ok(marked)
}

fn lazy_pages(entries: &[Entry]) -> u64 {
    entries
        .iter()
        .filter(|e| e.flags & PE_LAZY != 0)
        .map(|e| e.nr_pages)
        .sum()
}

/// What a checked image directory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ImageStats {
    /// Pagemaps (one per process or shared memory object).
    pub pagemaps: usize,
    /// Bytes of pages in this directory's pages files.
    pub present_bytes: u64,
    /// Bytes of pages taken from parent images.
    pub parent_bytes: u64,
}

/// Checks one pagemap against its pages file size and its parent's resolved ranges; returns
/// (present pages, parent pages) or what is wrong.
pub fn check_pagemaps(
    pm: &Pagemap,
    pages_file_len: u64,
    parent: Option<&[Extent]>,
) -> Result<(u64, u64), String> {
    let present: u64 = pm
        .entries
        .iter()
        .filter(|e| e.flags & PE_PRESENT != 0)
        .map(|e| e.nr_pages)
        .sum();
    if present * PAGE != pages_file_len {
        return Err(format!(
            "pages-{}.img holds {pages_file_len} bytes, the pagemap lists {present} pages ({} bytes)",
            pm.pages_id,
            present * PAGE
        ));
    }
    if let Some(w) = pm.entries.windows(2).find(|w| w[0].end() > w[1].vaddr) {
        return Err(format!(
            "entries overlap or are out of order at {:#x}",
            w[1].vaddr
        ));
    }
    let mut in_parent = 0;
    for e in pm.entries.iter().filter(|e| e.flags & PE_PARENT != 0) {
        let Some(parent) = parent else {
            return Err(format!(
                "{} pages at {:#x} are in a parent image, but there is no parent",
                e.nr_pages, e.vaddr
            ));
        };
        // The parent's extents are sorted: only those from the first ending after this entry's
        // start can overlap it (a scan of all of them per entry took seconds for 1 GiB, frozen).
        let from = parent.partition_point(|p| p.end <= e.vaddr);
        let covered: u64 = parent[from..]
            .iter()
            .take_while(|p| p.start < e.end())
            .map(|p| p.end.min(e.end()).saturating_sub(p.start.max(e.vaddr)))
            .sum();
        if covered != e.nr_pages * PAGE {
            return Err(format!(
                "{} pages at {:#x} are in the parent image, which has only {} of them",
                e.nr_pages,
                e.vaddr,
                covered / PAGE
            ));
        }
        in_parent += e.nr_pages;
    }
    Ok((present, in_parent))
}

/// Checks the image directory of one dump: the files CRIU needs to start a restore, and every
/// pagemap (see [`check_pagemaps`]) through its parent chain.
pub fn check(images: &Path) -> Result<ImageStats, ImageError> {
    let bad = |reason: String| ImageError::Format {
        path: images.display().to_string(),
        reason,
    };
    for f in ["inventory.img", "pstree.img"] {
        if !images.join(f).is_file() {
            return Err(bad(format!("{f} is missing")));
        }
    }
    let mut stats = ImageStats::default();
    let entries = std::fs::read_dir(images).map_err(|source| ImageError::Io {
        op: "list",
        path: images.display().to_string(),
        source,
    })?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("pagemap-") && name.ends_with(".img")) {
            continue;
        }
        let pm = read_pagemap(&e.path())?;
        let pages = images.join(format!("pages-{}.img", pm.pages_id));
        let len = std::fs::metadata(&pages).map(|m| m.len()).unwrap_or(0);
        let parent_dir = images.join("parent");
        let parent = if parent_dir.join(&name).exists() {
            Some(resolved(&parent_dir, &name)?)
        } else {
            None
        };
        let (present, in_parent) = check_pagemaps(&pm, len, parent.as_deref())
            .map_err(|reason| bad(format!("{name}: {reason}")))?;
        stats.pagemaps += 1;
        stats.present_bytes += present * PAGE;
        stats.parent_bytes += in_parent * PAGE;
    }
    if stats.pagemaps == 0 {
        return Err(bad("no pagemap-*.img".into()));
    }
    // A dump into FOAM: its files must hold exactly the pages the pagemaps list.
    if images.join(crate::foam::DIR).is_dir() {
        crate::foam::check(images)?;
    }
    Ok(stats)
}

/// An mm image as CRIU writes it, with these VMAs (and a field [`parse_vmas`] skips): for tests.
#[cfg(test)]
pub(crate) fn render_mm(vmas: &[(u64, u64)]) -> Vec<u8> {
    let mut body = Vec::new();
    {
        let mut s = CodedOutputStream::vec(&mut body);
        let _ = s.write_uint64(1, 0x40_0000);
        for &(a, b) in vmas {
            let mut vma = Vec::new();
            {
                let mut v = CodedOutputStream::vec(&mut vma);
                let _ = v.write_uint64(1, a);
                let _ = v.write_uint64(2, b);
                let _ = v.write_uint32(5, 3);
                let _ = v.flush();
            }
            let _ = s.write_bytes(14, &vma);
        }
        let _ = s.flush();
    }
    let mut out = Vec::new();
    out.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
    out.extend_from_slice(&MM_MAGIC.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(vaddr: u64, nr_pages: u64, flags: u32) -> Entry {
        Entry {
            vaddr,
            nr_pages,
            flags,
        }
    }

    /// A pagemap image as CRIU writes it (head, then entries with vaddr, nr_pages, flags).
    fn image(pages_id: u32, entries: &[Entry]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
        out.extend_from_slice(&PAGEMAP_MAGIC.to_le_bytes());
        let mut record = |build: &dyn Fn(&mut protobuf::CodedOutputStream)| {
            let mut body = Vec::new();
            {
                let mut s = protobuf::CodedOutputStream::vec(&mut body);
                build(&mut s);
                s.flush().unwrap();
            }
            out.extend_from_slice(&(body.len() as u32).to_le_bytes());
            out.extend_from_slice(&body);
        };
        record(&|s| s.write_uint32(1, pages_id).unwrap());
        for x in entries {
            record(&|s| {
                s.write_uint64(1, x.vaddr).unwrap();
                s.write_uint32(2, x.nr_pages as u32).unwrap();
                s.write_uint32(4, x.flags).unwrap();
                s.write_uint64(5, x.nr_pages).unwrap();
            });
        }
        out
    }

    #[test]
    fn render_then_parse_is_identity() {
        let pm = Pagemap {
            pages_id: 7,
            entries: vec![
                e(0x55ee_8b72_6000, 2, PE_PRESENT | PE_LAZY),
                e(0x7f1f_22f6_6000, 1 << 20, PE_PARENT | PE_LAZY),
            ],
        };
        assert_eq!(parse(&render(&pm)).unwrap(), pm);
        assert_eq!(render(&pm), image(7, &pm.entries));
    }

    #[test]
    fn parses_what_criu_writes() {
        let entries = [
            e(0x55ee_8b72_6000, 2, PE_PRESENT | PE_LAZY),
            e(0x7f1f_22f6_6000, 1 << 20, PE_PARENT),
        ];
        let pm = parse(&image(7, &entries)).unwrap();
        assert_eq!(pm.pages_id, 7);
        assert_eq!(pm.entries, entries);
    }

    #[test]
    fn bad_images_are_refused() {
        assert!(parse(b"nope").is_err());
        let mut bytes = image(1, &[e(0x1000, 1, PE_PRESENT)]);
        bytes.truncate(bytes.len() - 1);
        assert!(parse(&bytes).unwrap_err().contains("truncated"));
    }

    #[test]
    fn old_images_in_parent_field_reads_as_parent() {
        // vaddr=0x1000 (field 1), compat_nr_pages=3 (field 2), in_parent=true (field 3).
        let entry = [0x08, 0x80, 0x20, 0x10, 0x03, 0x18, 0x01];
        let head = [0x08, 0x05];
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
        bytes.extend_from_slice(&PAGEMAP_MAGIC.to_le_bytes());
        for r in [&head[..], &entry[..]] {
            bytes.extend_from_slice(&(r.len() as u32).to_le_bytes());
            bytes.extend_from_slice(r);
        }
        let pm = parse(&bytes).unwrap();
        assert_eq!(pm.pages_id, 5);
        assert_eq!(pm.entries, [e(0x1000, 3, PE_PARENT)]);
    }

    #[test]
    fn pages_file_must_match_the_pagemap() {
        let pm = Pagemap {
            pages_id: 1,
            entries: vec![e(0, 2, PE_PRESENT), e(4 * PAGE, 1, PE_PRESENT | PE_LAZY)],
        };
        assert_eq!(check_pagemaps(&pm, 3 * PAGE, None), Ok((3, 0)));
        let err = check_pagemaps(&pm, 2 * PAGE, None).unwrap_err();
        assert!(err.contains("pages-1.img holds 8192 bytes"), "{err}");
        let overlap = Pagemap {
            pages_id: 1,
            entries: vec![e(0, 2, PE_PRESENT), e(PAGE, 1, PE_PRESENT)],
        };
        assert!(
            check_pagemaps(&overlap, 3 * PAGE, None)
                .unwrap_err()
                .contains("overlap")
        );
    }

    fn ext(start: u64, end: u64, lazy: bool, data: Option<(usize, u64)>) -> Extent {
        Extent {
            start,
            end,
            lazy,
            data,
        }
    }

    #[test]
    fn parent_pages_must_be_in_the_parent_chain() {
        let grandparent = locate(&[e(0, 8, PE_PRESENT | PE_LAZY)], 1, &[]);
        let parent = locate(
            &[e(0, 2, PE_PARENT), e(2 * PAGE, 2, PE_PRESENT)],
            0,
            &grandparent,
        );
        assert_eq!(
            parent,
            [
                ext(0, 2 * PAGE, true, Some((1, 0))),
                ext(2 * PAGE, 4 * PAGE, false, Some((0, 0)))
            ]
        );
        let pm = Pagemap {
            pages_id: 3,
            entries: vec![e(0, 4, PE_PARENT), e(4 * PAGE, 1, PE_PRESENT)],
        };
        assert_eq!(check_pagemaps(&pm, PAGE, Some(&parent)), Ok((1, 4)));
        let beyond = Pagemap {
            pages_id: 3,
            entries: vec![e(2 * PAGE, 4, PE_PARENT)],
        };
        let err = check_pagemaps(&beyond, 0, Some(&parent)).unwrap_err();
        assert!(err.contains("has only 2 of them"), "{err}");
        assert!(
            check_pagemaps(&beyond, 0, None)
                .unwrap_err()
                .contains("no parent")
        );
    }

    /// A three-layer chain: pre-1 (everything), pre-2 (pages 2..4 changed), final (page 5 changed).
    fn three_layers() -> [Vec<Entry>; 3] {
        let p = PAGE;
        [
            vec![
                e(0, 5, PE_PARENT),
                e(5 * p, 1, PE_PRESENT | PE_LAZY),
                e(6 * p, 4, PE_PARENT),
            ],
            vec![
                e(0, 2, PE_PARENT),
                e(2 * p, 2, PE_PRESENT | PE_LAZY),
                e(4 * p, 6, PE_PARENT),
            ],
            // Pages 8..10 are a stack: never lazy.
            vec![e(0, 8, PE_PRESENT | PE_LAZY), e(8 * p, 2, PE_PRESENT)],
        ]
    }

    #[test]
    fn every_page_is_found_in_the_layer_that_holds_it() {
        let p = PAGE;
        let [fin, parent, grandparent] = three_layers();
        let gp = locate(&grandparent, 2, &[]);
        let pa = locate(&parent, 1, &gp);
        let f = locate(&fin, 0, &pa);
        assert_eq!(
            f,
            [
                ext(0, 2 * p, true, Some((2, 0))),
                ext(2 * p, 4 * p, true, Some((1, 0))),
                ext(4 * p, 5 * p, true, Some((2, 4 * p))),
                ext(5 * p, 6 * p, true, Some((0, 0))),
                ext(6 * p, 8 * p, true, Some((2, 6 * p))),
                ext(8 * p, 10 * p, false, Some((2, 8 * p))),
            ]
        );
        // Offsets count only the pages a layer holds itself.
        let two_present = locate(
            &[
                e(0, 1, PE_PRESENT),
                e(p, 1, PE_PARENT),
                e(2 * p, 3, PE_PRESENT),
            ],
            0,
            &[ext(p, 2 * p, false, Some((1, 7 * p)))],
        );
        assert_eq!(two_present[1].data, Some((1, 7 * p)));
        assert_eq!(two_present[2].data, Some((0, p)));
    }

    #[test]
    fn parent_holes_take_the_parents_laziness_and_split_where_it_changes() {
        let p = PAGE;
        let [fin, parent, grandparent] = three_layers();
        let pa = locate(&parent, 1, &locate(&grandparent, 2, &[]));
        let out = with_parent_laziness(&fin, &pa);
        assert_eq!(
            out,
            [
                e(0, 5, PE_PARENT | PE_LAZY),
                e(5 * p, 1, PE_PRESENT | PE_LAZY),
                e(6 * p, 2, PE_PARENT | PE_LAZY),
                e(8 * p, 2, PE_PARENT),
            ]
        );
        assert!(out.windows(2).all(|w| w[0].end() == w[1].vaddr));
        // Pages the parent lacks keep their entry as it was.
        let gap = with_parent_laziness(&[e(0, 4, PE_PARENT)], &[ext(p, 2 * p, true, None)]);
        assert_eq!(
            gap,
            [
                e(0, 1, PE_PARENT),
                e(p, 1, PE_PARENT | PE_LAZY),
                e(2 * p, 2, PE_PARENT)
            ]
        );
        // The rewritten pagemap is what CRIU reads back.
        let pm = Pagemap {
            pages_id: 9,
            entries: out,
        };
        assert_eq!(parse(&render(&pm)).unwrap(), pm);
    }

    #[test]
    fn lazy_ranges_stop_at_each_vma_end() {
        let p = PAGE;
        let entries = [
            e(0, 4, PE_PRESENT | PE_LAZY),
            e(4 * p, 2, PE_PRESENT),
            e(8 * p, 4, PE_PARENT | PE_LAZY),
        ];
        let vmas = [(0, 2 * p), (2 * p, 6 * p), (8 * p, 16 * p)];
        assert_eq!(
            lazy_ranges(&entries, &vmas),
            [(0, 2 * p), (2 * p, 4 * p), (8 * p, 12 * p)]
        );
    }

    #[test]
    fn vmas_are_read_from_the_mm_image() {
        let vmas = [(0x1000, 0x5000), (0x7f00_0000_0000, 0x7f00_0010_0000)];
        assert_eq!(parse_vmas(&render_mm(&vmas)).unwrap(), vmas);
        assert!(parse_vmas(b"short").is_err());
        let mut cut = render_mm(&vmas);
        cut.truncate(cut.len() - 3);
        assert!(parse_vmas(&cut).is_err());
    }

    #[test]
    fn a_chain_on_disk_is_indexed_and_marked_lazy() {
        let p = PAGE;
        let [fin, parent, grandparent] = three_layers();
        let root = tempfile::tempdir().unwrap();
        let dirs = ["pre-1", "pre-2", "final"].map(|d| root.path().join(d));
        for (i, (d, entries)) in dirs.iter().zip([grandparent, parent, fin]).enumerate() {
            std::fs::create_dir(d).unwrap();
            if i > 0 {
                std::os::unix::fs::symlink(
                    format!("../{}", ["pre-1", "pre-2"][i - 1]),
                    d.join("parent"),
                )
                .unwrap();
            }
            let pm = Pagemap {
                pages_id: 10 + i as u32,
                entries,
            };
            let present: u64 = pm
                .entries
                .iter()
                .filter(|x| x.flags & PE_PRESENT != 0)
                .map(|x| x.nr_pages)
                .sum();
            std::fs::write(d.join("pagemap-42.img"), render(&pm)).unwrap();
            std::fs::write(
                d.join(format!("pages-{}.img", 10 + i)),
                vec![i as u8; (present * p) as usize],
            )
            .unwrap();
        }
        let fin_dir = &dirs[2];
        std::fs::write(fin_dir.join("mm-42.img"), render_mm(&[(0, 10 * p)])).unwrap();
        std::fs::write(fin_dir.join("inventory.img"), b"x").unwrap();
        std::fs::write(fin_dir.join("pstree.img"), b"x").unwrap();
        assert_eq!(mark_parent_pages_lazy(fin_dir).unwrap(), 7);
        let s = check(fin_dir).unwrap();
        assert_eq!((s.present_bytes, s.parent_bytes), (p, 9 * p));
        let idx = process_pages(fin_dir, 42).unwrap();
        assert_eq!(
            idx.pages_files,
            [
                fin_dir.join("pages-12.img"),
                fin_dir.join("parent/pages-11.img"),
                fin_dir.join("parent/parent/pages-10.img")
            ]
        );
        assert_eq!(idx.lazy, [(0, 5 * p), (5 * p, 6 * p), (6 * p, 8 * p)]);
        assert_eq!(idx.extents.len(), 6);
        assert_eq!(idx.extents[1].data, Some((1, 0)));
        assert!(process_pages(fin_dir, 7).is_err());
    }

    #[test]
    fn a_dump_into_foam_is_checked_and_indexed_at_its_addresses() {
        use crate::foam;
        let p = PAGE;
        let root = tempfile::tempdir().unwrap();
        let images = root.path();
        // The final dump's directory as kup leaves it: a parent round without pagemaps (CRIU sent
        // its pages to FOAM), the pagemap kup wrote, FOAM beside it.
        std::fs::create_dir(images.join("pre-1")).unwrap();
        std::os::unix::fs::symlink("pre-1", images.join("parent")).unwrap();
        let mut store = foam::Foam::create(&images.join(foam::DIR)).unwrap();
        let heap = 0x5555_0000_0000u64;
        let (slice, offset) = foam::place(heap);
        std::os::unix::fs::FileExt::write_all_at(
            store.file("pagemap-42", slice).unwrap(),
            &vec![7u8; 3 * p as usize],
            offset,
        )
        .unwrap();
        let present = std::collections::BTreeMap::from([(
            "pagemap-42".to_owned(),
            vec![e(heap, 3, PE_PRESENT | PE_LAZY)],
        )]);
        foam::write_restore_images(&images.join(foam::DIR), images, &present).unwrap();
        std::fs::write(images.join("mm-42.img"), render_mm(&[(heap, heap + 4 * p)])).unwrap();
        std::fs::write(images.join("inventory.img"), b"x").unwrap();
        std::fs::write(images.join("pstree.img"), b"x").unwrap();
        let s = check(images).unwrap();
        assert_eq!((s.present_bytes, s.parent_bytes), (3 * p, 0));
        let idx = process_pages(images, 42).unwrap();
        assert_eq!(
            idx.pages_files,
            [images
                .join(foam::DIR)
                .join("pagemap-42")
                .join(foam::slice_name(slice))]
        );
        assert_eq!(idx.lazy, [(heap, heap + 3 * p)]);
        assert_eq!(idx.extents[0].data, Some((0, offset)));
        // A page lost from FOAM fails the check.
        store.punch("pagemap-42", heap + p, heap + 2 * p).unwrap();
        let err = check(images).unwrap_err().to_string();
        assert!(err.contains("are listed but not stored"), "{err}");
    }

    #[test]
    fn a_directory_without_a_dump_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = check(dir.path()).unwrap_err().to_string();
        assert!(err.contains("inventory.img is missing"), "{err}");
        std::fs::write(dir.path().join("inventory.img"), b"x").unwrap();
        std::fs::write(dir.path().join("pstree.img"), b"x").unwrap();
        std::fs::write(
            dir.path().join("pagemap-1.img"),
            image(1, &[e(0, 2, PE_PRESENT)]),
        )
        .unwrap();
        std::fs::write(dir.path().join("pages-1.img"), vec![0u8; PAGE as usize]).unwrap();
        let err = check(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("pagemap-1.img: pages-1.img holds 4096 bytes"),
            "{err}"
        );
        std::fs::write(dir.path().join("pages-1.img"), vec![0u8; 2 * PAGE as usize]).unwrap();
        let s = check(dir.path()).unwrap();
        assert_eq!(
            (s.pagemaps, s.present_bytes, s.parent_bytes),
            (1, 2 * PAGE, 0)
        );
    }
}
