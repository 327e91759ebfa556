//! `kup-docs OUTDIR`: writes kup's man pages and shell completions from the clap definitions that
//! also give `--help`, so the two cannot drift apart. packaging/build-deb installs what it writes:
//!
//! - `OUTDIR/man/kupctl.8`, `OUTDIR/man/kupd.8`
//! - `OUTDIR/completions/kupctl.bash`, `OUTDIR/completions/_kupctl` (zsh), `OUTDIR/completions/kupctl.fish`
//!
//! kup.toml(5) is written by hand (`packaging/man/kup.toml.5`): it documents a file, not a command.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use clap::CommandFactory as _;
use clap_complete::Shell;

fn main() -> Result<()> {
    let out = std::env::args_os().nth(1).map(PathBuf::from).context(
        "usage: kup-docs OUTDIR (writes OUTDIR/man and OUTDIR/completions); packaging/build-deb runs it",
    )?;
    write_all(&out)
}

fn write_all(out: &Path) -> Result<()> {
    let man = out.join("man");
    let completions = out.join("completions");
    for dir in [&man, &completions] {
        std::fs::create_dir_all(dir).with_context(|| {
            format!(
                "kup-docs: cannot create {}: check the permissions",
                dir.display()
            )
        })?;
    }
    let kupctl = kupctl::Cli::command().name("kupctl");
    write_man(&man.join("kupctl.8"), kupctl.clone())?;
    write_man(&man.join("kupd.8"), kupd::cli::command())?;
    for (shell, name) in [
        (Shell::Bash, "kupctl.bash"),
        (Shell::Zsh, "_kupctl"),
        (Shell::Fish, "kupctl.fish"),
    ] {
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut kupctl.clone(), "kupctl", &mut buf);
        write(&completions.join(name), &buf)?;
    }
    Ok(())
}

fn write_man(path: &Path, cmd: clap::Command) -> Result<()> {
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd)
        .section("8")
        .manual("kup")
        .source(format!("kup {}", env!("CARGO_PKG_VERSION")))
        .render(&mut buf)
        .with_context(|| format!("kup-docs: cannot render {}", path.display()))?;
    write(path, &buf)
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).with_context(|| {
        format!(
            "kup-docs: cannot write {}: check the permissions",
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn man_pages_and_completions_carry_the_commands() {
        let dir = std::env::temp_dir().join(format!("kup-docs-test-{}", std::process::id()));
        super::write_all(&dir).expect("writes");
        let kupctl = std::fs::read_to_string(dir.join("man/kupctl.8")).expect("kupctl.8");
        assert!(kupctl.contains(".TH kupctl 8"), "{kupctl}");
        for sub in ["update", "status", "units", "stage"] {
            assert!(kupctl.contains(sub), "kupctl.8 lacks {sub}");
        }
        let kupd = std::fs::read_to_string(dir.join("man/kupd.8")).expect("kupd.8");
        assert!(kupd.contains("org.kup.Manager1"), "{kupd}");
        let bash = std::fs::read_to_string(dir.join("completions/kupctl.bash")).expect("bash");
        assert!(bash.contains("--kernel"), "{bash}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
