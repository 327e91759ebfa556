//! CRIU's pagemap images (`pagemap-ID.img`, CRIU's images/pagemap.proto): read, and rewritten so that
//! pages an incremental dump left in its parent images (pre-copy rounds) are restored lazily too.
//!
//! CRIU marks a page `PE_LAZY` when its mapping can be served by userfaultfd, but an incremental
//! dump records the pages it found unchanged as a `PE_PARENT` hole without that flag, so a lazy
//! restore would read every pre-copied page eagerly: with pre-copy on, nearly all of them. The
//! parents' own entries say which of those pages are lazy; [`mark_parent_pages_lazy`] carries the
//! flag over, splitting holes where it changes. Restore and lazy-pages both read `PE_PARENT` pages
//! through the parent chain, so only the flag changes. [`parse`] and [`render`] are pure.

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

/// The lazy flag of every page range of `entries`, resolving `PE_PARENT` ranges through
/// `parent` (the parent image's resolved ranges): `(start, end, lazy)`, sorted.
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

/// `entries` with each `PE_PARENT` entry split along `parent` and flagged `PE_LAZY` where the
/// parent's page is lazy. Pages the parent does not have keep their entry unchanged.
pub fn with_parent_laziness(entries: &[Entry], parent: &[(u64, u64, bool)]) -> Vec<Entry> {
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
        for &(s, t, lazy) in parent {
            let (a, b) = (s.max(at), t.min(e.end()));
            if a >= b {
                continue;
            }
            push(at, a, e.flags);
            let flags = if lazy {
                e.flags | PE_LAZY
            } else {
                e.flags & !PE_LAZY
            };
            push(a, b, flags);
            at = b;
        }
        push(at, e.end(), e.flags);
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

/// Rewrites the pagemaps of the dump in `images` so that pages left in parent images are lazy
/// where the parents say so. Returns the number of pages newly marked lazy.
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
        let parent = resolved(&parent_dir, &name, 0)?;
        let before: u64 = lazy_pages(&pm.entries);
        pm.entries = with_parent_laziness(&pm.entries, &parent);
        marked += lazy_pages(&pm.entries) - before;
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

    #[test]
    fn render_then_parse_is_identity() {
        let pm = Pagemap {
            pages_id: 7,
            entries: vec![
                e(0x55ee_8b72_6000, 2, PE_PRESENT | PE_LAZY),
                e(0x7f1f_22f6_6000, 1 << 20, PE_PARENT),
            ],
        };
        assert_eq!(parse(&render(&pm)).unwrap(), pm);
    }

    #[test]
    fn bad_images_are_refused() {
        assert!(parse(b"nope").is_err());
        let mut bytes = render(&Pagemap {
            pages_id: 1,
            entries: vec![e(0x1000, 1, PE_PRESENT)],
        });
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
    fn parent_holes_take_the_parents_laziness_split_where_it_changes() {
        let p = PAGE;
        // Grandparent: 0..8 pages lazy, 8..10 not lazy (e.g. a stack).
        let gp = resolve(
            &[e(0, 8, PE_PRESENT | PE_LAZY), e(8 * p, 2, PE_PRESENT)],
            &[],
        );
        // Parent: pages 2..4 changed (present, lazy), the rest in the grandparent.
        let parent = resolve(
            &[
                e(0, 2, PE_PARENT),
                e(2 * p, 2, PE_PRESENT | PE_LAZY),
                e(4 * p, 6, PE_PARENT),
            ],
            &gp,
        );
        // Final dump: page 5 changed, everything else in the parent.
        let fin = [
            e(0, 5, PE_PARENT),
            e(5 * p, 1, PE_PRESENT | PE_LAZY),
            e(6 * p, 4, PE_PARENT),
        ];
        let out = with_parent_laziness(&fin, &parent);
        assert_eq!(
            out,
            [
                e(0, 2, PE_PARENT | PE_LAZY),
                e(2 * p, 2, PE_PARENT | PE_LAZY),
                e(4 * p, 1, PE_PARENT | PE_LAZY),
                e(5 * p, 1, PE_PRESENT | PE_LAZY),
                e(6 * p, 2, PE_PARENT | PE_LAZY),
                e(8 * p, 2, PE_PARENT),
            ]
        );
        // Every page is still described exactly once, in order.
        let pages: u64 = out.iter().map(|x| x.nr_pages).sum();
        assert_eq!(pages, 10);
        assert!(out.windows(2).all(|w| w[0].end() == w[1].vaddr));
    }

    #[test]
    fn pages_the_parent_lacks_stay_as_they_were() {
        let out = with_parent_laziness(&[e(0, 4, PE_PARENT)], &[(PAGE, 2 * PAGE, true)]);
        assert_eq!(
            out,
            [
                e(0, 1, PE_PARENT),
                e(PAGE, 1, PE_PARENT | PE_LAZY),
                e(2 * PAGE, 2, PE_PARENT)
            ]
        );
    }
}
