//! The cached guest image: `<cache>/image-<key>/{root.img,kernels/}` built once per recipe key by
//! `build-image.sh` (mmdebstrap from Debian's packages) and reused by every later run and by CI.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use nix::fcntl::{Flock, FlockArg};

use crate::recipe::Recipe;

/// A built image in the cache.
#[derive(Debug, Clone)]
pub struct Image {
    pub dir: PathBuf,
}

/// `$KUP_LAB_CACHE`, else `~/.cache/kup-lab`.
pub fn cache_root() -> PathBuf {
    if let Some(p) = std::env::var_os("KUP_LAB_CACHE") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/kup-lab")
}

impl Image {
    pub fn root_img(&self) -> PathBuf {
        self.dir.join("root.img")
    }

    /// The ESP disk: GPT, one EFI System Partition (FAT32, label `KUP-ESP`) with systemd-boot and
    /// one BLS entry per kernel (`recipe::entry_id`).
    pub fn esp_img(&self) -> Result<PathBuf> {
        let p = self.dir.join("esp.img");
        if !p.is_file() {
            bail!(
                "the lab image {} has no esp.img (built by an older recipe?); remove that directory and run `lab image` to rebuild it",
                self.dir.display()
            );
        }
        Ok(p)
    }

    /// The kernel image and initrd of `version`, with an error listing the ones there are.
    pub fn kernel(&self, version: &str) -> Result<(PathBuf, PathBuf)> {
        let k = self.dir.join("kernels").join(format!("vmlinuz-{version}"));
        let i = self
            .dir
            .join("kernels")
            .join(format!("initrd.img-{version}"));
        if !k.is_file() || !i.is_file() {
            bail!(
                "no kernel {version:?} in the lab image; available: {}; add it to KERNELS in tests/lab/image/versions.env (or KUP_LAB_KERNELS)",
                self.kernels().join(", ")
            );
        }
        Ok((k, i))
    }

    /// Kernel versions in the image, in the recipe's order (the first boots by default).
    pub fn kernels(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("kernels.txt"))
            .map(|t| t.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default()
    }
}

/// Returns the image for `recipe`, building it first when the cache has none for its key.
pub fn ensure(recipe: &Recipe) -> Result<Image> {
    let root = cache_root();
    std::fs::create_dir_all(&root)
        .with_context(|| format!("cannot create the lab cache {}", root.display()))?;
    let key = recipe.cache_key()?;
    let dir = root.join(format!("image-{key}"));
    let image = Image { dir: dir.clone() };
    if dir.join("ok").is_file() {
        return Ok(image);
    }
    let lock = File::create(root.join("build.lock"))?;
    let _lock = Flock::lock(lock, FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .context("cannot lock the lab cache for building")?;
    if dir.join("ok").is_file() {
        return Ok(image); // another process built it while we waited
    }
    let tmp = root.join(format!("image-{key}.tmp"));
    let log = root.join(format!("image-{key}.log"));
    eprintln!(
        "lab: building the guest image {key} (a few minutes; log: {})",
        log.display()
    );
    let script = recipe.dir.join("build-image.sh");
    let started = std::time::Instant::now();
    // One open file for both streams: two separate opens would overwrite each other's lines.
    let log_file = File::create(&log)?;
    let status = Command::new(&script)
        .arg(&tmp)
        .envs(recipe.build_env())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .status()
        .with_context(|| format!("cannot run {}", script.display()))?;
    if !status.success() {
        let tail = tail_lines(&log, 15);
        bail!(
            "building the lab image failed ({status}); last lines of {}:\n{tail}",
            log.display()
        );
    }
    std::fs::write(tmp.join("kernels.txt"), recipe.kernels().join("\n") + "\n")?;
    std::fs::write(
        tmp.join("recipe.txt"),
        recipe
            .vars
            .iter()
            .map(|(k, v)| format!("{k}={v}\n"))
            .collect::<String>(),
    )?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::rename(&tmp, &dir)?;
    File::create(dir.join("ok"))?.sync_all()?;
    eprintln!(
        "lab: image {key} built in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    prune(&root, &key);
    Ok(image)
}

/// Drops images of other recipe keys (each is a few GiB of sparse file) unless one is in use.
fn prune(root: &Path, keep: &str) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("image-")
            && !name.starts_with(&format!("image-{keep}"))
            && !name.ends_with(".lock")
        {
            let p = e.path();
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }
}

/// The last `n` lines of a text file, for error messages.
pub fn tail_lines(path: &Path, n: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
