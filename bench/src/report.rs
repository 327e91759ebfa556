//! Variants (one measured run each), the measures taken from them, and the results table: absolute
//! numbers per variant and working set, plus the ratios the benchmark is for
//! (`D_kup / D_switch`, `D_kup(max ws) / D_kup(min ws)`, `D_kup / D_naive`), as markdown and JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::timeline::{Timeline, secs};

/// What a variant does across the update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// kexec to the new kernel without any checkpoint: the floor of what a kernel switch costs.
    Switch,
    /// `kupctl update` with everything on.
    Kup,
    /// One full dump and restore, no pre-copy, no memory kept across.
    Naive,
    /// Stop the service, reboot, start it again (empty cache).
    Cold,
    Other,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Switch => "switch",
            Kind::Kup => "kup",
            Kind::Naive => "naive",
            Kind::Cold => "cold",
            Kind::Other => "other",
        }
    }
}

/// One measured run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Variant {
    /// Shown in the table and the legend.
    pub name: String,
    pub kind: Kind,
    /// Bytes of values loaded ([`crate::working_set_bytes`]).
    pub working_set_bytes: u64,
    pub timeline: Timeline,
    /// Anything else the orchestration wants kept (kernel versions, pre-copy rounds, image
    /// sizes...); shown in the table's last column.
    #[serde(default)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl Variant {
    pub fn new(name: &str, kind: Kind, working_set_bytes: u64, timeline: Timeline) -> Variant {
        Variant {
            name: name.to_owned(),
            kind,
            working_set_bytes,
            timeline,
            extra: BTreeMap::new(),
        }
    }

    pub fn save(&self, path: &Path) -> Result<(), Error> {
        crate::write_json(path, self)
    }

    pub fn load(path: &Path) -> Result<Variant, Error> {
        crate::read_json(path)
    }
}

/// How the measures are taken; the defaults are the documented ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Analysis {
    /// The downtime window starts here (default `update-start`); without this mark, at 0.
    pub update_mark: String,
    /// The downtime window ends here (default none: the end of the run).
    pub end_mark: Option<String>,
    /// Baseline: median throughput over this many seconds before the update mark (default 5);
    /// without the mark, the median over the whole run.
    pub baseline_window_s: f64,
    /// Recovery: smoothing window, hold time and fraction of the baseline (defaults 1 s, 1 s, 0.9).
    pub smoothing_s: f64,
    pub hold_s: f64,
    pub fraction: f64,
}

impl Default for Analysis {
    fn default() -> Analysis {
        Analysis {
            update_mark: "update-start".into(),
            end_mark: None,
            baseline_window_s: 5.0,
            smoothing_s: 1.0,
            hold_s: 1.0,
            fraction: 0.9,
        }
    }
}

/// The measures of one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Answers per second before the update.
    pub baseline_ops: Option<f64>,
    /// Longest interval without any answer overlapping the update (see [`crate::timeline`]).
    pub downtime_s: f64,
    /// Seconds since the start of the run.
    pub outage_start_s: f64,
    pub outage_end_s: Option<f64>,
    /// From the end of the outage until the throughput is back at 90 % of the baseline.
    pub time_to_90pct_s: Option<f64>,
    pub ok: u64,
    pub misses: u64,
    pub wrong: u64,
    pub errors: u64,
    /// `Keep` mode: every original connection answered correctly after the outage.
    pub connections_survived: Option<bool>,
}

impl Analysis {
    pub fn metrics(&self, tl: &Timeline) -> Metrics {
        let mark = tl.mark(&self.update_mark);
        let from = mark.unwrap_or(0.0);
        let to = self
            .end_mark
            .as_deref()
            .and_then(|m| tl.mark(m))
            .unwrap_or(tl.duration_s())
            .max(from);
        let baseline = match mark {
            Some(at) => tl.baseline(at, self.baseline_window_s),
            None => tl.median_throughput(),
        };
        let outage = tl.downtime(from, to);
        let time_to_90pct_s = match (outage.end_s, baseline) {
            (Some(end), Some(b)) => {
                tl.time_to_fraction(end, b, self.fraction, self.smoothing_s, self.hold_s)
            }
            _ => None,
        };
        let t = tl.totals();
        Metrics {
            baseline_ops: baseline,
            downtime_s: outage.secs,
            outage_start_s: outage.start_s,
            outage_end_s: outage.end_s,
            time_to_90pct_s,
            ok: t.ok,
            misses: t.miss,
            wrong: t.wrong,
            errors: t.errors,
            connections_survived: tl.connections_survived(),
        }
    }
}

/// One line of the table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub name: String,
    pub kind: Kind,
    pub working_set_bytes: u64,
    pub metrics: Metrics,
    #[serde(default)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// A ratio of downtimes; `None` when a side is missing or zero.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ratio {
    /// e.g. `D_kup/D_switch`.
    pub name: String,
    /// The working set it is taken at (`None` for the one across working sets).
    pub working_set_bytes: Option<u64>,
    pub value: Option<f64>,
}

/// The results: rows sorted by working set then kind, and the ratios.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Table {
    pub analysis: Analysis,
    pub rows: Vec<Row>,
    pub ratios: Vec<Ratio>,
}

impl Table {
    /// Measures every variant. Where a kind was run several times at one working set, the ratios
    /// use the median of its downtimes; `D_switch` comes from the same working set, or else from
    /// the median over all switch runs (a switch without checkpoint does not depend on it).
    pub fn new(variants: &[Variant], analysis: &Analysis) -> Table {
        let mut rows: Vec<Row> = variants
            .iter()
            .map(|v| Row {
                name: v.name.clone(),
                kind: v.kind,
                working_set_bytes: v.working_set_bytes,
                metrics: analysis.metrics(&v.timeline),
                extra: v.extra.clone(),
            })
            .collect();
        rows.sort_by(|a, b| {
            (a.working_set_bytes, a.kind, &a.name).cmp(&(b.working_set_bytes, b.kind, &b.name))
        });
        let ratios = ratios(&rows);
        Table {
            analysis: analysis.clone(),
            rows,
            ratios,
        }
    }

    pub fn to_json(&self) -> Result<String, Error> {
        serde_json::to_string_pretty(self).map_err(|e| Error::Json {
            path: "(table)".into(),
            source: e,
        })
    }

    /// `table.md` and `table.json` in `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), Error> {
        let md = dir.join("table.md");
        std::fs::write(&md, self.markdown()).map_err(|source| Error::File { path: md, source })?;
        crate::write_json(&dir.join("table.json"), self)
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let a = &self.analysis;
        let _ = writeln!(
            s,
            "| variant | kind | working set | baseline ops/s | downtime s | time to {:.0}% s | ok | misses | wrong | errors | conn. survived | notes |",
            a.fraction * 100.0
        );
        s.push_str(
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |\n",
        );
        for r in &self.rows {
            let m = &r.metrics;
            let downtime = match m.outage_end_s {
                Some(_) => format!("{:.2}", m.downtime_s),
                None => format!(">= {:.2} (no recovery)", m.downtime_s),
            };
            let notes: Vec<String> = r.extra.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.name,
                r.kind.as_str(),
                human_bytes(r.working_set_bytes),
                m.baseline_ops.map_or("-".into(), |b| format!("{b:.0}")),
                downtime,
                m.time_to_90pct_s.map_or("-".into(), |t| format!("{t:.2}")),
                m.ok,
                m.misses,
                m.wrong,
                m.errors,
                m.connections_survived
                    .map_or("-", |c| if c { "yes" } else { "no" }),
                notes.join(", ")
            );
        }
        if !self.ratios.is_empty() {
            s.push_str("\n| ratio | working set | value |\n| --- | ---: | ---: |\n");
            for r in &self.ratios {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} |",
                    r.name,
                    r.working_set_bytes.map_or("-".into(), human_bytes),
                    r.value.map_or("-".into(), |v| format!("{v:.2}"))
                );
            }
        }
        let _ = writeln!(
            s,
            "\ndowntime: longest interval without any answer from memcached, over all client threads, \
             overlapping [{}, {}]; time to {:.0}%: from the end of that interval until the throughput \
             averaged over {} s stays >= {:.0}% of the baseline (median over {} s before the update) for {} s.",
            a.update_mark,
            a.end_mark.as_deref().unwrap_or("end of run"),
            a.fraction * 100.0,
            a.smoothing_s,
            a.fraction * 100.0,
            a.baseline_window_s,
            a.hold_s
        );
        s
    }
}

fn median_downtime(rows: &[&Row]) -> Option<f64> {
    let mut v: Vec<f64> = rows.iter().map(|r| r.metrics.downtime_s).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn ratio(num: Option<f64>, den: Option<f64>) -> Option<f64> {
    match (num, den) {
        (Some(n), Some(d)) if d > 0.0 => Some(n / d),
        _ => None,
    }
}

fn ratios(rows: &[Row]) -> Vec<Ratio> {
    let of = |kind: Kind, ws: Option<u64>| -> Vec<&Row> {
        rows.iter()
            .filter(|r| r.kind == kind && ws.is_none_or(|w| r.working_set_bytes == w))
            .collect()
    };
    let mut kup_ws: Vec<u64> = of(Kind::Kup, None)
        .iter()
        .map(|r| r.working_set_bytes)
        .collect();
    kup_ws.sort_unstable();
    kup_ws.dedup();
    let mut out = Vec::new();
    for &ws in &kup_ws {
        let kup = median_downtime(&of(Kind::Kup, Some(ws)));
        let switch = median_downtime(&of(Kind::Switch, Some(ws)))
            .or_else(|| median_downtime(&of(Kind::Switch, None)));
        out.push(Ratio {
            name: "D_kup/D_switch".into(),
            working_set_bytes: Some(ws),
            value: ratio(kup, switch),
        });
    }
    if let (Some(&min), Some(&max)) = (kup_ws.first(), kup_ws.last()) {
        if min != max {
            out.push(Ratio {
                name: "D_kup(max ws)/D_kup(min ws)".into(),
                working_set_bytes: None,
                value: ratio(
                    median_downtime(&of(Kind::Kup, Some(max))),
                    median_downtime(&of(Kind::Kup, Some(min))),
                ),
            });
        }
    }
    for &ws in &kup_ws {
        let naive = of(Kind::Naive, Some(ws));
        if naive.is_empty() {
            continue;
        }
        out.push(Ratio {
            name: "D_kup/D_naive".into(),
            working_set_bytes: Some(ws),
            value: ratio(
                median_downtime(&of(Kind::Kup, Some(ws))),
                median_downtime(&naive),
            ),
        });
    }
    out
}

/// `1.5 MiB`-style sizes.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Seconds since the start of `tl` of its `label` mark, or 0.
pub fn align_at(tl: &Timeline, label: &str) -> f64 {
    tl.mark(label).unwrap_or(0.0)
}

/// The variant's throughput series with the time axis shifted so `label` is at 0.
pub fn aligned_series(v: &Variant, label: &str) -> Vec<(f64, f64)> {
    let at = align_at(&v.timeline, label);
    v.timeline
        .throughput_series()
        .into_iter()
        .map(|(t, y)| (t - at, y))
        .collect()
}

/// The duration of the run in seconds (for axis ranges).
pub fn run_secs(v: &Variant) -> f64 {
    secs(v.timeline.duration_us)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timeline::tests::synthetic;

    /// A run with an outage of `down_ms` starting 1 s after the update mark at 5 s.
    fn run(down_ms: u64) -> Timeline {
        synthetic(
            12_000,
            5,
            &[(6_000, 6_000 + down_ms)],
            |_| 1.0,
            &[("update-start", 5_000)],
        )
    }

    #[test]
    fn metrics_of_a_run() {
        let m = Analysis::default().metrics(&run(1_500));
        assert!((m.downtime_s - 1.5).abs() < 0.02, "{m:?}");
        assert!((m.baseline_ops.unwrap() - 400.0).abs() < 1.0, "{m:?}");
        assert!(m.time_to_90pct_s.unwrap() < 0.11, "{m:?}");
        assert_eq!(m.wrong, 0);
        assert_eq!(m.errors, 2);
        assert_eq!(m.connections_survived, None);
    }

    #[test]
    fn the_table_has_the_ratios_asked_for() {
        let mb = 1 << 20;
        let variants = vec![
            Variant::new("switch", Kind::Switch, 10 * mb, run(1_000)),
            Variant::new("kup small", Kind::Kup, 10 * mb, run(2_000)),
            Variant::new("naive small", Kind::Naive, 10 * mb, run(4_000)),
            Variant::new("kup large", Kind::Kup, 100 * mb, run(3_000)),
            Variant::new("kup large again", Kind::Kup, 100 * mb, run(3_400)),
            Variant::new("naive large", Kind::Naive, 100 * mb, run(5_000)),
        ];
        let t = Table::new(&variants, &Analysis::default());
        assert_eq!(t.rows.len(), 6);
        assert_eq!(t.rows[0].kind, Kind::Switch);
        let get = |name: &str, ws: Option<u64>| {
            t.ratios
                .iter()
                .find(|r| r.name == name && r.working_set_bytes == ws)
                .and_then(|r| r.value)
                .unwrap()
        };
        let close = |a: f64, b: f64| (a - b).abs() < 0.05;
        assert!(close(get("D_kup/D_switch", Some(10 * mb)), 2.0));
        // no switch run at 100 MiB: the switch runs of any working set
        assert!(close(get("D_kup/D_switch", Some(100 * mb)), 3.2));
        assert!(close(get("D_kup(max ws)/D_kup(min ws)", None), 1.6));
        assert!(close(get("D_kup/D_naive", Some(10 * mb)), 0.5));
        assert!(close(get("D_kup/D_naive", Some(100 * mb)), 3.2 / 5.0));
        let md = t.markdown();
        assert!(md.contains("| kup small | kup | 10.0 MiB |"), "{md}");
        assert!(
            md.contains("| D_kup(max ws)/D_kup(min ws) | - | 1.60 |"),
            "{md}"
        );
        let back: Table = serde_json::from_str(&t.to_json().unwrap()).unwrap();
        assert_eq!(back.rows.len(), t.rows.len());
        for (a, b) in back.ratios.iter().zip(&t.ratios) {
            assert_eq!(
                (&a.name, a.working_set_bytes),
                (&b.name, b.working_set_bytes)
            );
            assert!(close(a.value.unwrap(), b.value.unwrap()));
        }
    }

    #[test]
    fn missing_sides_give_no_ratio() {
        let t = Table::new(
            &[Variant::new("kup", Kind::Kup, 1, run(1_000))],
            &Analysis::default(),
        );
        assert_eq!(
            t.ratios,
            vec![Ratio {
                name: "D_kup/D_switch".into(),
                working_set_bytes: Some(1),
                value: None
            }]
        );
        assert!(t.markdown().contains("| D_kup/D_switch | 1 B | - |"));
    }

    #[test]
    fn sizes() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
    }
}
