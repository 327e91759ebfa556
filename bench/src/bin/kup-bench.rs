//! `kup-bench`: the benchmark's host side by hand, against any memcached on 127.0.0.1
//! (`load`, `verify`, `run`, `report`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use kup_bench::lab::{LabBench, Scenario};
use kup_bench::report::human_bytes;
use kup_bench::{Analysis, Kind, Load, LoadConfig, Mode, Table, Variant};

#[derive(Debug, Parser)]
#[command(
    name = "kup-bench",
    about = "kup's downtime benchmark (memcached load, report, plot)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ModeArg {
    Reconnect,
    Keep,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum KindArg {
    Switch,
    Kup,
    Naive,
    Cold,
    Other,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Stores keys 0..N with their deterministic values.
    Load {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        keys: u32,
    },
    /// Reads keys 0..N back and counts the good and bad ones (exit 1 when any is bad).
    Verify {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        keys: u32,
    },
    /// Runs the get/set load for S seconds and writes the run to OUT/NAME.json.
    Run {
        #[arg(long)]
        port: u16,
        /// Keys 0..K, loaded beforehand (`load`).
        #[arg(long)]
        keys: u32,
        #[arg(long, default_value_t = 4)]
        threads: usize,
        #[arg(long)]
        seconds: f64,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value = "reconnect")]
        mode: ModeArg,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        #[arg(long, default_value_t = 10)]
        set_percent: u8,
        /// The variant's name (file name and legend).
        #[arg(long, default_value = "run")]
        name: String,
        #[arg(long, value_enum, default_value = "other")]
        kind: KindArg,
        /// A mark at a time of the run, e.g. `--mark 5=update-start` (repeatable).
        #[arg(long = "mark", value_parser = parse_mark)]
        marks: Vec<(f64, String)>,
    },
    /// The benchmark in the lab: for each working set, a fresh guest per scenario (plain kexec,
    /// naive kup, kup with everything on), the load from the host across the kernel switch; then the
    /// report of `report` over every run.
    Lab {
        /// Working sets in MiB.
        #[arg(long, value_delimiter = ',', default_values_t = [256u64, 1024, 2200])]
        ws: Vec<u64>,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 4096)]
        mem: u32,
        #[arg(long, default_value = "6.12.107+deb13-cloud-amd64")]
        old: String,
        #[arg(long, default_value = "6.12.117+deb13-cloud-amd64")]
        new: String,
        /// Load seconds before the update (baseline) and after the guest is back at multi-user.
        #[arg(long, default_value_t = 8)]
        before: u64,
        #[arg(long, default_value_t = 30)]
        after: u64,
        #[arg(long, default_value_t = 4)]
        threads: usize,
        /// Run on kup's own kernels (kernel-patches/build: 7.2.13-kup -> 7.3.4-kup, KHO/LUO built in)
        /// instead of --old/--new: each guest installs them and kexecs into the first before the
        /// working set is loaded. Needed by the `luo` scenario.
        #[arg(long)]
        kup_kernels: bool,
        /// Scenarios to run, in this order.
        #[arg(long, value_delimiter = ',', default_values_t = ["switch".to_string(), "naive".to_string(), "kup".to_string()])]
        scenarios: Vec<String>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Reads the runs (*.json variants) in the IN directories, writes OUT/table.md,
    /// OUT/table.json and one throughput plot per working set.
    Report {
        #[arg(long = "in", required = true, num_args = 1..)]
        inputs: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        /// The mark the downtime window starts at and the plots align on.
        #[arg(long, default_value = "update-start")]
        update_mark: String,
    },
}

fn parse_mark(s: &str) -> Result<(f64, String), String> {
    let (t, label) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected SECS=LABEL"))?;
    let t: f64 = t.parse().map_err(|e| format!("{t:?}: {e}"))?;
    if t.is_nan() || t < 0.0 || label.is_empty() {
        return Err(format!("{s:?}: expected SECS=LABEL with SECS >= 0"));
    }
    Ok((t, label.to_owned()))
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Load { port, keys } => {
            let bytes = kup_bench::load_keys(port, keys)?;
            println!("loaded {keys} keys, {}", human_bytes(bytes));
        }
        Cmd::Verify { port, keys } => {
            let (good, bad) = kup_bench::verify_keys(port, keys)?;
            println!("good {good} bad {bad}");
            if bad > 0 {
                std::process::exit(1);
            }
        }
        Cmd::Run {
            port,
            keys,
            threads,
            seconds,
            out,
            mode,
            timeout_ms,
            set_percent,
            name,
            kind,
            mut marks,
        } => {
            if seconds.is_nan() || seconds <= 0.0 {
                bail!("--seconds must be > 0");
            }
            let mut cfg = LoadConfig::new(port, keys);
            cfg.threads = threads;
            cfg.timeout = Duration::from_millis(timeout_ms);
            cfg.set_percent = set_percent.min(100);
            cfg.mode = match mode {
                ModeArg::Reconnect => Mode::Reconnect,
                ModeArg::Keep => Mode::Keep,
            };
            let handle = Load::start(cfg)?;
            let start = Instant::now();
            marks.sort_by(|a, b| a.0.total_cmp(&b.0));
            for (at, label) in marks.iter().filter(|(at, _)| *at < seconds) {
                sleep_until(start + Duration::from_secs_f64(*at));
                handle.mark(label);
            }
            sleep_until(start + Duration::from_secs_f64(seconds));
            let timeline = handle.stop();
            let kind = match kind {
                KindArg::Switch => Kind::Switch,
                KindArg::Kup => Kind::Kup,
                KindArg::Naive => Kind::Naive,
                KindArg::Cold => Kind::Cold,
                KindArg::Other => Kind::Other,
            };
            let variant = Variant::new(&name, kind, kup_bench::working_set_bytes(keys), timeline);
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let path = out.join(format!("{name}.json"));
            variant.save(&path)?;
            let m = Analysis::default().metrics(&variant.timeline);
            println!(
                "{}: ok {} misses {} wrong {} errors {} downtime {:.3} s -> {}",
                name,
                m.ok,
                m.misses,
                m.wrong,
                m.errors,
                m.downtime_s,
                path.display()
            );
        }
        Cmd::Lab {
            ws,
            mem,
            old,
            new,
            before,
            after,
            threads,
            kup_kernels,
            scenarios,
            out,
        } => {
            let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            let (old, new, debs) = if kup_kernels {
                let mut debs = Vec::new();
                for series in ["7.2", "7.3"] {
                    let out = std::process::Command::new(repo.join("kernel-patches/build"))
                        .args(["--source", series])
                        .output()
                        .context("running kernel-patches/build")?;
                    if !out.status.success() {
                        bail!(
                            "kernel-patches/build --source {series} failed: {}",
                            String::from_utf8_lossy(&out.stderr)
                        );
                    }
                    let text = String::from_utf8_lossy(&out.stdout).into_owned();
                    let deb = text
                        .lines()
                        .find(|l| l.contains("linux-image-"))
                        .with_context(|| {
                            format!("kernel-patches/build --source {series} printed no package")
                        })?;
                    debs.push(PathBuf::from(deb));
                }
                ("7.2.13-kup".to_owned(), "7.3.4-kup".to_owned(), debs)
            } else {
                (old, new, Vec::new())
            };
            let bench = LabBench {
                lab_bin: repo.join("target/release/kup-lab"),
                repo,
                run_dir: std::env::temp_dir().join(format!("kup-bench-{}", std::process::id())),
                mem_mib: mem,
                old,
                new,
                before: Duration::from_secs(before),
                after: Duration::from_secs(after),
                threads,
                kup_kernels: debs,
            };
            let scenarios = scenarios
                .iter()
                .map(|s| match s.as_str() {
                    "switch" => Ok(Scenario::Switch),
                    "naive" => Ok(Scenario::Naive),
                    "kup" => Ok(Scenario::Kup),
                    "kup-criu" => Ok(Scenario::KupCriu),
                    "lazy" => Ok(Scenario::Lazy),
                    "precopy" => Ok(Scenario::PreCopy),
                    "luo" if !kup_kernels => {
                        bail!("scenario luo needs LUO on both kernels: add --kup-kernels")
                    }
                    "luo" => Ok(Scenario::Luo),
                    other => {
                        bail!(
                            "unknown scenario {other:?}; use switch, naive, kup, kup-criu, lazy, precopy or luo"
                        )
                    }
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let runs = out.join("runs");
            std::fs::create_dir_all(&runs)
                .with_context(|| format!("creating {}", runs.display()))?;
            let mut failures = Vec::new();
            for mib in &ws {
                for &sc in &scenarios {
                    let t = Instant::now();
                    eprintln!("bench: {mib} MiB, {}", sc.name());
                    let tag = format!("{mib:05}MiB-{sc:?}").to_lowercase();
                    // A failed run is a result too: it is recorded and the others still run.
                    let v = match bench.run(sc, mib << 20) {
                        Ok(v) => v,
                        Err(e) => {
                            let why = format!("{} at {mib} MiB failed: {e:#}", sc.name());
                            eprintln!("bench: {why}");
                            failures.push(why.clone());
                            let path = runs.join(format!("{tag}.failed"));
                            std::fs::write(&path, format!("{why}\n"))
                                .with_context(|| format!("writing {}", path.display()))?;
                            continue;
                        }
                    };
                    v.save(&runs.join(format!("{tag}.json")))?;
                    let m = Analysis::default().metrics(&v.timeline);
                    eprintln!(
                        "bench: {mib} MiB, {}: downtime {:.2} s, wrong {}, run took {:.0} s",
                        sc.name(),
                        m.downtime_s,
                        m.wrong,
                        t.elapsed().as_secs_f64()
                    );
                }
            }
            report(&[runs], &out, "update-start".into())?;
            if !failures.is_empty() {
                bail!(
                    "{} run(s) failed (recorded as runs/*.failed):\n{}",
                    failures.len(),
                    failures.join("\n")
                );
            }
        }
        Cmd::Report {
            inputs,
            out,
            update_mark,
        } => report(&inputs, &out, update_mark)?,
    }
    Ok(())
}

/// Writes OUT/table.md, OUT/table.json and one plot per working set from the runs in `inputs`.
fn report(inputs: &[PathBuf], out: &Path, update_mark: String) -> anyhow::Result<()> {
    let variants = read_variants(inputs)?;
    if variants.is_empty() {
        bail!("no runs (*.json variants) in {inputs:?}");
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let analysis = Analysis {
        update_mark,
        ..Analysis::default()
    };
    let table = Table::new(&variants, &analysis);
    table.write(out)?;
    let mut sizes: Vec<u64> = variants.iter().map(|v| v.working_set_bytes).collect();
    sizes.sort_unstable();
    sizes.dedup();
    for ws in sizes {
        let these: Vec<Variant> = variants
            .iter()
            .filter(|v| v.working_set_bytes == ws)
            .cloned()
            .collect();
        let png = out.join(format!("throughput-{ws}.png"));
        let title = format!(
            "memcached throughput across the update, working set {}",
            human_bytes(ws)
        );
        kup_bench::plot(&png, &title, &these)?;
        println!("{}", png.display());
    }
    print!("{}", table.markdown());
    Ok(())
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

/// Every `*.json` in the directories that is a variant (the table's own JSON is skipped).
fn read_variants(dirs: &[PathBuf]) -> anyhow::Result<Vec<Variant>> {
    let mut out = Vec::new();
    for dir in dirs {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "json") && !is_table(p))
            .collect();
        paths.sort();
        for p in paths {
            out.push(Variant::load(&p)?);
        }
    }
    Ok(out)
}

fn is_table(p: &Path) -> bool {
    p.file_name().is_some_and(|n| n == "table.json")
}
