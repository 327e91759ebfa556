//! The benchmark in the lab: for each working set and scenario, a fresh guest whose memcached holds
//! the working set, the load running from the host through the forwarded port, and one kernel switch
//! (plain `systemctl kexec`, kup without its downtime features, kup with all of them). Each run is
//! saved as a [`Variant`] with the guest's own stage timings as extra fields.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{Kind, Load, LoadConfig, Mode, Variant};

/// Why a lab run failed.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("cannot run {what}: {source}")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{what}` failed: {output}")]
    Failed { what: String, output: String },
    #[error(transparent)]
    Bench(#[from] crate::Error),
}

/// What is switched and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// `systemctl kexec` with nothing checkpointed: memcached comes back empty (D_switch and, as
    /// the cache refills, D_cold).
    Switch,
    /// kup with a full CRIU dump to disk and a full restore: no pre-copy, no lazy restore.
    Naive,
    /// kup with everything on (D_kup): pre-copy (3 rounds) while serving into FOAM, a short final
    /// dump, a lazy restore (kup's lazy-pages server reads each page at its address in FOAM), kept
    /// TCP connections.
    Kup,
    /// `Kup` with CRIU's own images (`store = "criu"`): a chain of pages images, one per round,
    /// instead of FOAM (the measurement behind FOAM's choice).
    KupCriu,
    /// kup with a lazy restore and no pre-copy: the final dump copies everything under freeze.
    Lazy,
    /// kup with pre-copy (3 rounds) and an eager restore.
    PreCopy,
    /// kup with everything on and the images kept in RAM across the kexec (`backend = "luo"`):
    /// needs LUO on both kernels (`--kup-kernels`). Counted as D_kup. kup's kernels carry the PPP
    /// patch, so the memory is kept in place (`luo_in_place`, on by default: no disk copy, lazy
    /// restore): no copy of it, whatever its size.
    Luo,
}

impl Scenario {
    pub const ALL: [Scenario; 7] = [
        Scenario::Switch,
        Scenario::Naive,
        Scenario::Kup,
        Scenario::KupCriu,
        Scenario::Lazy,
        Scenario::PreCopy,
        Scenario::Luo,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Switch => "switch (cold restart, data lost)",
            Scenario::Naive => "naive (full dump + full restore)",
            Scenario::Kup => "kup (pre-copy + lazy restore, FOAM)",
            Scenario::KupCriu => "kup, CRIU's image chain instead of FOAM",
            Scenario::Lazy => "kup (lazy restore, no pre-copy)",
            Scenario::PreCopy => "kup (pre-copy + eager restore)",
            Scenario::Luo => "kup luo (images in RAM, memory kept in place, lazy restore)",
        }
    }

    pub fn kind(self) -> Kind {
        match self {
            Scenario::Switch => Kind::Switch,
            Scenario::Naive => Kind::Naive,
            Scenario::Kup | Scenario::Luo => Kind::Kup,
            Scenario::KupCriu | Scenario::Lazy | Scenario::PreCopy => Kind::Other,
        }
    }

    /// The guest's /etc/kup/kup.toml.
    pub fn config(self) -> &'static str {
        match self {
            Scenario::Switch => "",
            Scenario::Naive => {
                "[update]\nprecopy_rounds = 0\nrestore = \"eager\"\n\n[[unit]]\nname = \"memcached.service\"\n"
            }
            Scenario::Kup => {
                "[update]\nprecopy_rounds = 3\nrestore = \"lazy\"\n\n[[unit]]\nname = \"memcached.service\"\n"
            }
            Scenario::KupCriu => {
                "[update]\nprecopy_rounds = 3\nrestore = \"lazy\"\nstore = \"criu\"\n\n[[unit]]\nname = \"memcached.service\"\n"
            }
            Scenario::Lazy => {
                "[update]\nprecopy_rounds = 0\nrestore = \"lazy\"\n\n[[unit]]\nname = \"memcached.service\"\n"
            }
            Scenario::PreCopy => {
                "[update]\nprecopy_rounds = 3\nrestore = \"eager\"\n\n[[unit]]\nname = \"memcached.service\"\n"
            }
            Scenario::Luo => {
                "[update]\nbackend = \"luo\"\nluo_disk_copy = false\nprecopy_rounds = 3\nrestore = \"lazy\"\n\n[[unit]]\nname = \"memcached.service\"\n"
            }
        }
    }
}

/// Where and how the runs happen.
#[derive(Debug, Clone)]
pub struct LabBench {
    /// The kup repository (its packaging/install-tree and the lab's payload hook).
    pub repo: PathBuf,
    /// The `kup-lab` binary.
    pub lab_bin: PathBuf,
    /// `KUP_LAB_RUN_DIR` of the benchmark's guest.
    pub run_dir: PathBuf,
    /// Guest memory, MiB.
    pub mem_mib: u32,
    /// Kernel the guest boots, and the one it switches to.
    pub old: String,
    pub new: String,
    /// Load seconds before the update (the baseline) and after the guest is back.
    pub before: Duration,
    pub after: Duration,
    /// Load threads.
    pub threads: usize,
    /// kup's own kernel packages (kernel-patches/build) to install in the guest first; the guest
    /// then kexecs from Debian's kernel into `old` (one of them, with `kho=on liveupdate=on`)
    /// before the working set is loaded. Empty: `old` is a kernel of the lab image.
    pub kup_kernels: Vec<PathBuf>,
}

/// Where the payload puts kup's kernel packages in the guest.
const KERNELS_DIR: &str = "var/lib/kup-lab/kernels";

/// Average bytes of a value of the key scheme (100..5000, uniform).
const AVG_VALUE: u64 = 2550;

/// The number of keys whose values add up to about `bytes`.
pub fn keys_for(bytes: u64) -> u32 {
    u32::try_from(bytes / AVG_VALUE).unwrap_or(u32::MAX).max(1)
}

impl LabBench {
    fn lab(&self, args: &[&str]) -> Result<String, LabError> {
        let what = format!("kup-lab {}", args.join(" "));
        let out = Command::new(&self.lab_bin)
            .args(args)
            .env("KUP_LAB_RUN_DIR", &self.run_dir)
            .output()
            .map_err(|source| LabError::Spawn {
                what: what.clone(),
                source,
            })?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return Err(LabError::Failed {
                what,
                output: format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)),
            });
        }
        Ok(stdout)
    }

    fn exec(&self, cmd: &str) -> Result<String, LabError> {
        self.lab(&["exec", "--", cmd]).map(|s| s.trim().to_owned())
    }

    /// The lab's payload: kup's Debian package (installed with dpkg at first boot by the lab's
    /// payload hook) and `config` as /etc/kup/kup.toml.
    fn tree(&self, config: &str) -> Result<PathBuf, LabError> {
        let tree = self.run_dir.with_extension("tree");
        let _ = std::fs::remove_dir_all(&tree);
        let debs = tree.join("var/lib/kup-lab");
        let file_err = |path: &Path| {
            let path = path.to_owned();
            move |source| crate::Error::File { path, source }
        };
        std::fs::create_dir_all(&debs).map_err(file_err(&debs))?;
        let out = Command::new(self.repo.join("packaging/build-deb"))
            .arg(&debs)
            .output()
            .map_err(|source| LabError::Spawn {
                what: "packaging/build-deb".into(),
                source,
            })?;
        if !out.status.success() {
            return Err(LabError::Failed {
                what: "packaging/build-deb (build the workspace first: cargo build --release --workspace)"
                    .into(),
                output: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        let deb = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let kup_deb = debs.join("kup.deb");
        std::fs::rename(&deb, &kup_deb).map_err(file_err(&kup_deb))?;
        let hook = tree.join("usr/lib/kup-lab/payload-install");
        let hook_src = self.repo.join("tests/lab/payload/payload-install");
        std::fs::create_dir_all(tree.join("usr/lib/kup-lab")).map_err(file_err(&hook))?;
        std::fs::copy(&hook_src, &hook).map_err(file_err(&hook_src))?;
        let conf = tree.join("etc/kup/kup.toml");
        std::fs::create_dir_all(tree.join("etc/kup")).map_err(file_err(&conf))?;
        std::fs::write(&conf, config).map_err(file_err(&conf))?;
        let kernels = tree.join(KERNELS_DIR);
        for deb in &self.kup_kernels {
            std::fs::create_dir_all(&kernels).map_err(file_err(&kernels))?;
            let name = deb.file_name().unwrap_or_default();
            std::fs::copy(deb, kernels.join(name)).map_err(file_err(deb))?;
        }
        Ok(tree)
    }

    /// One run: a fresh guest, `ws` bytes in memcached, the load, the switch, the load again.
    pub fn run(&self, scenario: Scenario, ws: u64) -> Result<Variant, LabError> {
        let port = free_port()?;
        let tree = self.tree(scenario.config())?;
        let _ = self.lab(&["stop"]);
        // On kup's kernels the guest boots Debian's first kernel of the image, installs them and
        // switches to `old` with a plain kexec.
        let first = if self.kup_kernels.is_empty() {
            self.old.clone()
        } else {
            String::new()
        };
        let mut boot = vec!["start"];
        if !first.is_empty() {
            boot.extend(["--kernel", first.as_str()]);
        }
        self.lab(
            &[
                boot.as_slice(),
                &[
                    "--mem",
                    &self.mem_mib.to_string(),
                    "--forward",
                    &format!("{port}:11211"),
                    "--payload-tree",
                    &tree.display().to_string(),
                ],
            ]
            .concat(),
        )?;
        let result = self
            .onto_kup_kernel()
            .and_then(|()| self.run_in_guest(scenario, ws, port));
        // KUP_BENCH_KEEP: a failed run's guest stays up for a look (`KUP_LAB_RUN_DIR=... kup-lab
        // exec`); the benchmark stops there.
        if result.is_err() && std::env::var_os("KUP_BENCH_KEEP").is_some() {
            eprintln!(
                "bench: the failed run's guest is kept: KUP_LAB_RUN_DIR={} kup-lab exec -- CMD",
                self.run_dir.display()
            );
            std::process::exit(1);
        }
        let _ = self.lab(&["stop"]);
        result
    }

    /// With `kup_kernels`: installs them (dpkg -i; their hooks make the initrds with kup's module)
    /// and kexecs into `old` with `kho=on liveupdate=on`.
    fn onto_kup_kernel(&self) -> Result<(), LabError> {
        if self.kup_kernels.is_empty() {
            return Ok(());
        }
        let t = Instant::now();
        self.exec(&format!(
            "DEBIAN_FRONTEND=noninteractive dpkg -i /{KERNELS_DIR}/*.deb > /{KERNELS_DIR}/dpkg.log 2>&1 || {{ cat /{KERNELS_DIR}/dpkg.log; exit 1; }}"
        ))?;
        let v = &self.old;
        let _ = self.exec(&format!(
            "kexec -s -l /boot/vmlinuz-{v} --initrd=/boot/initrd.img-{v} --reuse-cmdline --append='kho=on liveupdate=on' && systemctl kexec --no-block"
        ));
        self.lab(&["wait", "--timeout", "400"])?;
        let running = self.exec("uname -r")?;
        if &running != v {
            return Err(LabError::Failed {
                what: format!("kexec into {v}"),
                output: format!("the guest runs {running}"),
            });
        }
        eprintln!(
            "bench: kup's kernels installed and {v} running in {:.0} s",
            t.elapsed().as_secs_f64()
        );
        Ok(())
    }

    fn run_in_guest(&self, scenario: Scenario, ws: u64, port: u16) -> Result<Variant, LabError> {
        // Room for the working set: memcached's cache is the guest's memory less 1 GiB.
        let cache = self.mem_mib.saturating_sub(1024);
        self.exec(&format!(
            "sed -i 's/^-m .*/-m {cache}/' /etc/memcached.conf && systemctl restart memcached"
        ))?;
        wait_answers(port, Duration::from_secs(30))?;
        let keys = keys_for(ws);
        let t = Instant::now();
        let bytes = crate::load_keys(port, keys)?;
        let load_s = t.elapsed().as_secs_f64();
        eprintln!(
            "bench: {}: {keys} keys, {} loaded in {load_s:.1} s",
            scenario.name(),
            crate::report::human_bytes(bytes)
        );

        let mut cfg = LoadConfig::new(port, keys);
        cfg.threads = self.threads;
        let load = Load::start(cfg)?;
        let mut keep_cfg = LoadConfig::new(port, keys);
        keep_cfg.threads = 1;
        keep_cfg.mode = Mode::Keep;
        keep_cfg.timeout = Duration::from_secs(5);
        let keep = Load::start(keep_cfg)?;
        std::thread::sleep(self.before);

        let mark = |label: &str| {
            load.mark(label);
            keep.mark(label);
        };
        mark("update-start");
        let trigger = match scenario {
            Scenario::Switch => format!(
                "kexec -s -l /boot/vmlinuz-{v} --initrd=/boot/initrd.img-{v} --reuse-cmdline && systemctl kexec --no-block",
                v = self.new
            ),
            Scenario::Naive
            | Scenario::Kup
            | Scenario::KupCriu
            | Scenario::Lazy
            | Scenario::PreCopy
            | Scenario::Luo => {
                format!("kupctl update --kernel {}", self.new)
            }
        };
        // The guest may go down before the command's answer reaches us: the new boot tells.
        let triggered = self.exec(&trigger);
        mark("switch");
        let up = self.lab(&["wait", "--timeout", "400"]);
        mark("multi-user");
        if let Err(e) = up {
            let _ = (load.stop(), keep.stop());
            return Err(match triggered {
                Err(t) => t,
                Ok(_) => e,
            });
        }
        std::thread::sleep(self.after);
        let timeline = load.stop();
        let keep_tl = keep.stop();

        let mut extra = BTreeMap::new();
        let mut put = |k: &str, v: serde_json::Value| {
            extra.insert(k.to_owned(), v);
        };
        put("keys", keys.into());
        put("bytes", bytes.into());
        put("guest_mem_mib", self.mem_mib.into());
        put("kernel_from", self.old.clone().into());
        put(
            "backend",
            if scenario == Scenario::Luo {
                "luo"
            } else {
                "disk"
            }
            .into(),
        );
        put("kernel_to", self.exec("uname -r")?.into());
        put(
            "kept_connection_survived",
            keep_tl.connections_survived().into(),
        );
        let start = keep_tl.mark("update-start").unwrap_or(0.0);
        let kept = keep_tl.downtime(start, keep_tl.duration_s());
        put("kept_connection_wait_s", kept.secs.into());
        if scenario != Scenario::Switch {
            let (good, bad) = crate::verify_keys(port, keys)?;
            eprintln!("bench: after the update: {good} keys identical, {bad} missing or different");
            put("verified_good", good.into());
            put("verified_bad", bad.into());
            put(
                "guest_dump_log",
                self.exec(
                    "journalctl -b -1 -o short-monotonic -u kupd --no-pager | grep 'kup:' || true",
                )?
                .into(),
            );
        }
        put(
            "guest_restore_log",
            self.exec(
                "journalctl -b 0 -o short-monotonic --no-pager -u memcached -u kup-netlock -u kup-restore-finish | grep -E 'Starting|Started|kup:' || true",
            )?
            .into(),
        );
        put(
            "guest_boot",
            self.exec("systemd-analyze time | head -1 || true")?.into(),
        );
        let mut v = Variant::new(scenario.name(), scenario.kind(), bytes, timeline);
        v.extra = extra;
        Ok(v)
    }
}

fn free_port() -> Result<u16, LabError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|source| LabError::Spawn {
            what: "a free local port".into(),
            source,
        })
}

fn wait_answers(port: u16, limit: Duration) -> Result<(), LabError> {
    let t = Instant::now();
    while !crate::answers(port) {
        if t.elapsed() > limit {
            return Err(LabError::Failed {
                what: format!("memcached through 127.0.0.1:{port}"),
                output: format!("no answer within {} s", limit.as_secs()),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cover_the_working_set() {
        let n = keys_for(64 << 20);
        let got = crate::working_set_bytes(n);
        let want = 64u64 << 20;
        assert!(got.abs_diff(want) < want / 20, "{got} vs {want}");
    }

    #[test]
    fn scenarios_configure_what_they_claim() {
        assert!(!Scenario::Switch.config().contains("[[unit]]"));
        assert!(Scenario::Naive.config().contains("restore = \"eager\""));
        assert!(Scenario::Naive.config().contains("precopy_rounds = 0"));
        assert!(Scenario::Kup.config().contains("restore = \"lazy\""));
        assert!(Scenario::Kup.config().contains("precopy_rounds = 3"));
        assert!(Scenario::Lazy.config().contains("precopy_rounds = 0"));
        assert_eq!(Scenario::Kup.kind(), Kind::Kup);
        // luo is kup with everything on, the images in RAM instead of on disk (no disk copy).
        assert_eq!(
            Scenario::Luo.config(),
            Scenario::Kup.config().replace(
                "[update]\n",
                "[update]\nbackend = \"luo\"\nluo_disk_copy = false\n"
            )
        );
        assert_eq!(Scenario::Luo.kind(), Kind::Kup);
        assert!(!Scenario::Kup.config().contains("backend"));
        assert_eq!(
            Scenario::KupCriu.config(),
            Scenario::Kup
                .config()
                .replace("lazy\"\n", "lazy\"\nstore = \"criu\"\n")
        );
    }
}
