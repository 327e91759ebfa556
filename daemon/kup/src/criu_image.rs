//! CRIU's image directories, checked before they are trusted: every pagemap (`pagemap-ID.img`,
//! CRIU's images/pagemap.proto) must parse, its pages file must hold exactly the pages it lists as
//! present, and pages it leaves in a parent image (pre-copy rounds) must be there. kup checks a unit's
//! images after its dump, before the kernel switch, and again before the restore (an `fsck` of the
//! image store). [`parse`], [`resolve`] and [`check_pagemaps`] are pure; [`check`] reads the files.

use std::path::Path;

use protobuf::CodedInputStream;

/// The page is in a parent image.
pub const PE_PARENT: u32 = 1 << 0;
/// The page can be restored lazily (userfaultfd).
pub const PE_LAZY: u32 = 1 << 1;
/// The page is in this image's pages file.
pub const PE_PRESENT: u32 = 1 << 2;

const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
const PAGEMAP_MAGIC: u32 = 0x5608_4025;
const PAGE: u64 = 4096;

/// Why a pagemap image could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path} is not a CRIU pagemap image ({reason}); the images are damaged: dump again")]
    Format { path: String, reason: String },
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

/// The page ranges `entries` make available, resolving `PE_PARENT` ranges through `parent` (the
/// parent image's resolved ranges): `(start, end, lazy)`, sorted. Parent pages the parent lacks
/// are missing from the result.
pub fn resolve(entries: &[Entry], parent: &[(u64, u64, bool)]) -> Vec<(u64, u64, bool)> {
    let mut out = Vec::new();
    for e in entries {
        if e.flags & PE_PARENT != 0 {
            for &(s, t, lazy) in parent {
                let (a, b) = (s.max(e.vaddr), t.min(e.end()));
                if a < b {
                    out.push((a, b, lazy));
                }
            }
        } else {
            out.push((e.vaddr, e.end(), e.flags & PE_LAZY != 0));
        }
    }
    out
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

/// The resolved lazy ranges of pagemap `name` in `dir`, through its `parent` links.
fn resolved(dir: &Path, name: &str, depth: u8) -> Result<Vec<(u64, u64, bool)>, ImageError> {
    let pm = read_pagemap(&dir.join(name))?;
    let parent_dir = dir.join("parent");
    let parent = if depth < 32 && parent_dir.join(name).exists() {
        resolved(&parent_dir, name, depth + 1)?
    } else {
        Vec::new()
    };
    Ok(resolve(&pm.entries, &parent))
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
    parent: Option<&[(u64, u64, bool)]>,
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
        let covered: u64 = parent
            .iter()
            .map(|&(s, t, _)| t.min(e.end()).saturating_sub(s.max(e.vaddr)))
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
            Some(resolved(&parent_dir, &name, 0)?)
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
    Ok(stats)
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

    #[test]
    fn parent_pages_must_be_in_the_parent_chain() {
        let grandparent = resolve(&[e(0, 8, PE_PRESENT | PE_LAZY)], &[]);
        let parent = resolve(
            &[e(0, 2, PE_PARENT), e(2 * PAGE, 2, PE_PRESENT)],
            &grandparent,
        );
        assert_eq!(parent, [(0, 2 * PAGE, true), (2 * PAGE, 4 * PAGE, false)]);
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
