//! The image recipe: pinned versions from `versions.env` (overridable from the environment) and the
//! cache key that changes whenever the recipe or an effective version changes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

/// Prefix of the environment variables that override a pinned value (`KUP_LAB_KERNELS=...`).
pub const ENV_PREFIX: &str = "KUP_LAB_";

/// The guest kernel's command line: what `-append` passes in kernel mode and what the image's boot
/// entries (`/etc/kernel/cmdline`, the ESP's `loader/entries/*.conf`) carry in firmware mode.
/// `watchdog.stop_on_reboot=0`: the boot loader's command line of a machine set up for kup's hang
/// protection (the watchdog keeps running through a kexec; docs/RELIABILITY.md).
pub const CMDLINE: &str =
    "root=LABEL=kup-lab-root rw console=ttyS0,115200 mitigations=off watchdog.stop_on_reboot=0";

/// The image's kernel-install entry token (`/etc/kernel/entry-token`): boot entries are
/// `loader/entries/<token>-<version>.conf`, independent of any machine id.
pub const ENTRY_TOKEN: &str = "kup-lab";

/// The boot loader entry id (systemd-boot's, as `bootctl list` and `set-oneshot` take it) of `version`.
pub fn entry_id(version: &str) -> String {
    format!("{ENTRY_TOKEN}-{version}.conf")
}

/// The effective recipe: the directory holding it and its variables after overrides.
#[derive(Debug, Clone)]
pub struct Recipe {
    pub dir: PathBuf,
    pub vars: BTreeMap<String, String>,
}

/// Parses `KEY=VALUE` lines (`#` comments, optional double quotes around the value).
/// Errors name the line and what is wrong with it.
pub fn parse_env(text: &str) -> Result<BTreeMap<String, String>> {
    let mut vars = BTreeMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            bail!("line {}: expected KEY=VALUE, found {line:?}", i + 1);
        };
        if key.is_empty()
            || !key
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        {
            bail!(
                "line {}: {key:?} is not a variable name (use A-Z, 0-9 and _)",
                i + 1
            );
        }
        let value = match value.strip_prefix('"') {
            Some(rest) => rest.strip_suffix('"').with_context(|| {
                format!("line {}: unterminated quote in the value of {key}", i + 1)
            })?,
            None => value,
        };
        vars.insert(key.to_owned(), value.to_owned());
    }
    Ok(vars)
}

impl Recipe {
    /// The recipe shipped with this build of the lab (`tests/lab/image`), or `$KUP_LAB_RECIPE`.
    pub fn default_dir() -> PathBuf {
        std::env::var_os("KUP_LAB_RECIPE")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("image"))
    }

    /// Loads `versions.env` from `dir` and applies `KUP_LAB_<NAME>` overrides from `env`.
    pub fn load(dir: &Path, env: impl IntoIterator<Item = (String, String)>) -> Result<Self> {
        let file = dir.join("versions.env");
        let text = std::fs::read_to_string(&file).with_context(|| {
            format!(
                "cannot read the lab recipe {}: is KUP_LAB_RECIPE right?",
                file.display()
            )
        })?;
        let mut vars =
            parse_env(&text).with_context(|| format!("{} is malformed", file.display()))?;
        for (k, v) in env {
            if let Some(name) = k.strip_prefix(ENV_PREFIX)
                && vars.contains_key(name)
            {
                vars.insert(name.to_owned(), v);
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
            vars,
        })
    }

    /// The kernels the image carries (Debian ABI names such as `6.12.107+deb13-cloud-amd64`).
    pub fn kernels(&self) -> Vec<String> {
        self.vars
            .get("KERNELS")
            .map(|k| k.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default()
    }

    /// The environment `build-image.sh` runs with: the effective variables and the lab's own
    /// constants the image carries (the entries' command line and token).
    pub fn build_env(&self) -> BTreeMap<String, String> {
        let mut env = self.vars.clone();
        env.insert("KERNEL_CMDLINE".into(), CMDLINE.into());
        env.insert("ENTRY_TOKEN".into(), ENTRY_TOKEN.into());
        env
    }

    /// A key that changes with any file of the recipe or any effective variable.
    pub fn cache_key(&self) -> Result<String> {
        // (name in the key, file): the recipe, and kup's dracut module that the image's initrds carry.
        let mut files = Vec::new();
        collect_files(&self.dir, &mut files)?;
        let mut named: Vec<(String, PathBuf)> = files
            .into_iter()
            .map(|f| {
                (
                    format!(
                        "image/{}",
                        f.strip_prefix(&self.dir).unwrap_or(&f).display()
                    ),
                    f,
                )
            })
            .collect();
        let dracut = self.dir.join("../../../dracut-module");
        if dracut.is_dir() {
            let mut files = Vec::new();
            collect_files(&dracut, &mut files)?;
            named.extend(files.into_iter().map(|f| {
                (
                    format!("dracut/{}", f.strip_prefix(&dracut).unwrap_or(&f).display()),
                    f,
                )
            }));
        }
        named.sort();
        let mut h = Sha256::new();
        for (name, f) in &named {
            h.update(name.as_bytes());
            h.update([0]);
            h.update(std::fs::read(f).with_context(|| format!("reading {}", f.display()))?);
            h.update([0]);
        }
        for (k, v) in self.build_env() {
            h.update(format!("{k}={v}\n").as_bytes());
        }
        let digest = h.finalize();
        Ok(digest.iter().take(8).map(|b| format!("{b:02x}")).collect())
    }
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect_files(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_comments_quotes_and_plain_values() {
        let vars = parse_env("# c\nSUITE=trixie\n\nKERNELS=\"a b\"\nEMPTY=\n").unwrap();
        assert_eq!(vars["SUITE"], "trixie");
        assert_eq!(vars["KERNELS"], "a b");
        assert_eq!(vars["EMPTY"], "");
    }

    #[test]
    fn rejects_bad_lines_naming_the_line() {
        let err = parse_env("SUITE=trixie\nnot a pair\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2"), "{err}");
        let err = parse_env("lower=x\n").unwrap_err().to_string();
        assert!(err.contains("lower"), "{err}");
        let err = parse_env("K=\"open\n").unwrap_err().to_string();
        assert!(err.contains("unterminated"), "{err}");
    }

    #[test]
    fn overrides_change_the_key_and_unknown_variables_are_ignored() {
        let dir = std::env::temp_dir().join(format!("kup-lab-recipe-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("versions.env"), "KERNELS=\"1 2\"\n").unwrap();
        let base = Recipe::load(&dir, []).unwrap();
        assert_eq!(base.kernels(), ["1", "2"]);
        assert_eq!(base.build_env()["KERNEL_CMDLINE"], CMDLINE);
        assert_eq!(base.build_env()["ENTRY_TOKEN"], ENTRY_TOKEN);
        assert_eq!(entry_id("1"), "kup-lab-1.conf");
        let same = Recipe::load(&dir, [("KUP_LAB_OTHER".into(), "x".into())]).unwrap();
        assert_eq!(base.cache_key().unwrap(), same.cache_key().unwrap());
        let over = Recipe::load(&dir, [("KUP_LAB_KERNELS".into(), "3".into())]).unwrap();
        assert_eq!(over.kernels(), ["3"]);
        assert_ne!(base.cache_key().unwrap(), over.cache_key().unwrap());
        let before = base.cache_key().unwrap();
        std::fs::write(dir.join("extra"), "changed").unwrap();
        assert_ne!(
            before,
            base.cache_key().unwrap(),
            "a changed recipe file changes the key"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
