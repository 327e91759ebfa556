//! What a load run recorded, in bounded memory, and the measures taken from it.
//!
//! Every request's outcome is counted in the bucket (default 100 ms) of its completion time; each
//! bucket also keeps the first and last *answer* in it. An **answer** is a reply that is correct
//! for the protocol and the data: a get returning the expected value, a get that misses, a set
//! `STORED`. A **wrong** reply (a value that differs from the key's deterministic value) is data
//! corruption, counted apart, and is not an answer. An **error** is a request that failed: no reply
//! within the timeout, a closed or refused connection, an error reply.
//!
//! **Downtime** ([`Timeline::downtime`]): merge the answers of all threads into one sequence of
//! times `a_1 < a_2 < ...` (plus the start of the run before the first, and the end of the run after
//! the last); the downtime over a window `[from, to]` is the longest interval `(a_k, a_k+1)` that
//! overlaps the window. So it is the longest time during which *no* client got any answer, and a
//! service that answers one thread but not another is not down. The buckets' first/last answers
//! make every interval that crosses a bucket boundary exact; an interval inside one bucket is
//! shorter than a bucket and cannot be the longest once there is an outage of a bucket or more.
//! An interval that runs to the end of the run is an outage that did not end (`end_s: None`).
//!
//! **Time to 90 %** ([`Timeline::time_to_fraction`]): with `S(t)` the mean throughput over
//! `[t, t + smoothing)` (answers per second), the smallest bucket start `t` at or after the outage's
//! end, minus the outage's end (at least 0), such that `S(t') >= 0.9 * baseline` for every bucket
//! start `t'` in `[t, t + hold]`. `None` when the run ends first. The **baseline** is the median of
//! the per-bucket throughput over the buckets wholly inside `[mark - window, mark)`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::Error;

/// What one request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The expected value, or `STORED`.
    Ok,
    /// A get that found nothing.
    Miss,
    /// A value that is not the key's value.
    Wrong,
    /// No reply in time, a broken connection or an error reply.
    Error,
}

/// What the load threads do after an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Drop the connection, wait 50 ms, connect again, go on.
    #[default]
    Reconnect,
    /// Never reconnect: after a timeout, keep waiting for the reply on the same connection (does a
    /// TCP connection survive the update?). A closed connection ends that thread's load.
    Keep,
}

/// The counts of one bucket; times in microseconds since the start of the run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    pub ok: u64,
    pub miss: u64,
    pub wrong: u64,
    pub errors: u64,
    /// First and last answer (ok or miss) completed in this bucket.
    pub first_answer_us: Option<u64>,
    pub last_answer_us: Option<u64>,
}

impl Bucket {
    pub fn answers(&self) -> u64 {
        self.ok + self.miss
    }

    fn merge(&mut self, other: &Bucket) {
        self.ok += other.ok;
        self.miss += other.miss;
        self.wrong += other.wrong;
        self.errors += other.errors;
        self.first_answer_us = min_opt(self.first_answer_us, other.first_answer_us);
        self.last_answer_us = self.last_answer_us.max(other.last_answer_us);
    }
}

fn min_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

/// A named instant (`update-start`, `kexec`, `restored`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mark {
    pub label: String,
    pub at_us: u64,
}

/// One thread's interval without answers: from its last answer before an error (or the start of
/// the run) to its next answer (`None`: none came before the end).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gap {
    pub thread: usize,
    pub start_us: u64,
    pub end_us: Option<u64>,
    /// Errors recorded inside the gap.
    pub errors: u64,
}

/// What became of one thread's connections.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionReport {
    pub thread: usize,
    /// Connections opened (1 when the original one lasted).
    pub connects: u64,
    /// The original connection was still open at the end.
    pub original_open: bool,
    /// Replies that came after their request had already timed out (`Keep` mode).
    pub late_replies: u64,
    pub last_error_us: Option<u64>,
    pub last_answer_us: Option<u64>,
}

impl ConnectionReport {
    /// The original connection is open and answered correctly after its last error (or had none).
    pub fn survived(&self) -> bool {
        self.connects <= 1
            && self.original_open
            && match (self.last_error_us, self.last_answer_us) {
                (None, _) => true,
                (Some(e), Some(a)) => a > e,
                (Some(_), None) => false,
            }
    }
}

/// A whole load run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timeline {
    pub bucket_us: u64,
    /// From the start of the load to its stop.
    pub duration_us: u64,
    pub threads: usize,
    pub mode: Mode,
    /// Bucket `i` covers `[i * bucket_us, (i + 1) * bucket_us)`.
    pub buckets: Vec<Bucket>,
    pub marks: Vec<Mark>,
    /// Per-thread intervals without answers that contain errors, in start order.
    pub gaps: Vec<Gap>,
    pub connections: Vec<ConnectionReport>,
}

/// The longest interval without any answer that overlaps the window asked for.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Outage {
    /// Seconds since the start of the run: the last answer before.
    pub start_s: f64,
    /// The first answer after; `None` when none came before the end of the run.
    pub end_s: Option<f64>,
    pub secs: f64,
}

/// Seconds from microseconds.
pub fn secs(us: u64) -> f64 {
    us as f64 / 1e6
}

fn us(secs: f64) -> u64 {
    (secs.max(0.0) * 1e6).round() as u64
}

/// Counts one thread's outcomes into buckets; the load threads use one each, tests build
/// synthetic timelines with it.
#[derive(Debug, Clone)]
pub struct Recorder {
    thread: usize,
    bucket_us: u64,
    buckets: Vec<Bucket>,
    gaps: Vec<Gap>,
    open_gap: Option<Gap>,
    last_answer_us: Option<u64>,
    last_error_us: Option<u64>,
}

impl Recorder {
    pub fn new(thread: usize, bucket_us: u64) -> Recorder {
        Recorder {
            thread,
            bucket_us: bucket_us.max(1),
            buckets: Vec::new(),
            gaps: Vec::new(),
            open_gap: None,
            last_answer_us: None,
            last_error_us: None,
        }
    }

    /// Records a request completed (or failed) at `at_us` since the start of the run.
    pub fn record(&mut self, at_us: u64, outcome: Outcome) {
        let i = usize::try_from(at_us / self.bucket_us).unwrap_or(usize::MAX);
        if self.buckets.len() <= i {
            self.buckets.resize(i + 1, Bucket::default());
        }
        let b = &mut self.buckets[i];
        match outcome {
            Outcome::Ok | Outcome::Miss => {
                if outcome == Outcome::Ok {
                    b.ok += 1;
                } else {
                    b.miss += 1;
                }
                b.first_answer_us = min_opt(b.first_answer_us, Some(at_us));
                b.last_answer_us = b.last_answer_us.max(Some(at_us));
                self.last_answer_us = Some(at_us);
                if let Some(mut gap) = self.open_gap.take() {
                    gap.end_us = Some(at_us);
                    self.gaps.push(gap);
                }
            }
            Outcome::Wrong => b.wrong += 1,
            Outcome::Error => {
                b.errors += 1;
                self.last_error_us = Some(at_us);
                let start_us = self.last_answer_us.unwrap_or(0);
                let thread = self.thread;
                self.open_gap
                    .get_or_insert(Gap {
                        thread,
                        start_us,
                        end_us: None,
                        errors: 0,
                    })
                    .errors += 1;
            }
        }
    }

    pub fn last_error_us(&self) -> Option<u64> {
        self.last_error_us
    }

    pub fn last_answer_us(&self) -> Option<u64> {
        self.last_answer_us
    }

    /// The buckets and gaps, the open gap closed with `end_us: None`.
    fn finish(mut self) -> (Vec<Bucket>, Vec<Gap>) {
        if let Some(gap) = self.open_gap.take() {
            self.gaps.push(gap);
        }
        (self.buckets, self.gaps)
    }
}

impl Timeline {
    /// Merges the threads' recorders into one timeline.
    pub fn from_recorders(
        recorders: Vec<Recorder>,
        duration_us: u64,
        mode: Mode,
        mut marks: Vec<Mark>,
        connections: Vec<ConnectionReport>,
    ) -> Timeline {
        let bucket_us = recorders.first().map_or(100_000, |r| r.bucket_us);
        let threads = recorders.len();
        let mut buckets =
            vec![Bucket::default(); usize::try_from(duration_us / bucket_us).unwrap_or(0) + 1];
        let mut gaps = Vec::new();
        for r in recorders {
            let (b, g) = r.finish();
            if buckets.len() < b.len() {
                buckets.resize(b.len(), Bucket::default());
            }
            for (into, from) in buckets.iter_mut().zip(&b) {
                into.merge(from);
            }
            gaps.extend(g);
        }
        gaps.sort_by_key(|g| (g.start_us, g.thread));
        marks.sort_by_key(|m| m.at_us);
        Timeline {
            bucket_us,
            duration_us,
            threads,
            mode,
            buckets,
            marks,
            gaps,
            connections,
        }
    }

    pub fn save(&self, path: &Path) -> Result<(), Error> {
        crate::write_json(path, self)
    }

    pub fn load(path: &Path) -> Result<Timeline, Error> {
        crate::read_json(path)
    }

    /// Seconds since the start of the run of the first mark with this label.
    pub fn mark(&self, label: &str) -> Option<f64> {
        self.marks
            .iter()
            .find(|m| m.label == label)
            .map(|m| secs(m.at_us))
    }

    pub fn duration_s(&self) -> f64 {
        secs(self.duration_us)
    }

    pub fn bucket_s(&self) -> f64 {
        secs(self.bucket_us)
    }

    /// The part of bucket `i` inside the run, in seconds.
    fn covered_s(&self, i: usize) -> f64 {
        let start = i as u64 * self.bucket_us;
        secs(self.bucket_us.min(self.duration_us.saturating_sub(start)))
    }

    /// Answers per second in each bucket; a bucket cut by the end of the run counts over its
    /// covered part; buckets past the end are 0.
    pub fn throughput(&self) -> Vec<f64> {
        self.buckets
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let covered = self.covered_s(i);
                if covered > 0.0 {
                    b.answers() as f64 / covered
                } else {
                    0.0
                }
            })
            .collect()
    }

    /// `(bucket start in seconds, answers per second)` for plotting.
    pub fn throughput_series(&self) -> Vec<(f64, f64)> {
        let b = self.bucket_s();
        self.throughput()
            .into_iter()
            .enumerate()
            .filter(|(i, _)| self.covered_s(*i) > 0.0)
            .map(|(i, v)| (i as f64 * b, v))
            .collect()
    }

    /// Number of buckets wholly inside the run.
    fn full_buckets(&self) -> usize {
        usize::try_from(self.duration_us / self.bucket_us)
            .unwrap_or(0)
            .min(self.buckets.len())
    }

    /// Median answers per second over the buckets wholly inside `[at_s - window_s, at_s)`.
    pub fn baseline(&self, at_s: f64, window_s: f64) -> Option<f64> {
        let b = self.bucket_s();
        let tp = self.throughput();
        let mut v: Vec<f64> = (0..self.full_buckets())
            .filter(|&i| {
                i as f64 * b >= at_s - window_s - 1e-9 && (i + 1) as f64 * b <= at_s + 1e-9
            })
            .map(|i| tp[i])
            .collect();
        median(&mut v)
    }

    /// Median answers per second over all the buckets wholly inside the run.
    pub fn median_throughput(&self) -> Option<f64> {
        let tp = self.throughput();
        let mut v: Vec<f64> = tp[..self.full_buckets()].to_vec();
        median(&mut v)
    }

    /// Intervals between consecutive answers of all threads, in microseconds, beginning with the
    /// start of the run and ending with its end (`None`: the end of the run, no answer came).
    pub fn answer_intervals(&self) -> Vec<(u64, Option<u64>)> {
        let mut out = Vec::new();
        let mut prev = 0u64;
        for b in &self.buckets {
            if let (Some(first), Some(last)) = (b.first_answer_us, b.last_answer_us) {
                out.push((prev, Some(first)));
                prev = last;
            }
        }
        out.push((prev, None));
        out
    }

    /// The longest interval without any answer that overlaps `[from_s, to_s]` (see the module's
    /// definition). An interval of zero length at `from_s` when nothing overlaps.
    pub fn downtime(&self, from_s: f64, to_s: f64) -> Outage {
        let (from, to) = (us(from_s), us(to_s));
        let mut best = Outage {
            start_s: from_s,
            end_s: Some(from_s),
            secs: 0.0,
        };
        for (start, end) in self.answer_intervals() {
            let stop = end.unwrap_or(self.duration_us.max(start));
            if start > to || stop < from {
                continue;
            }
            let len = secs(stop - start);
            if len > best.secs {
                best = Outage {
                    start_s: secs(start),
                    end_s: end.map(secs),
                    secs: len,
                };
            }
        }
        best
    }

    /// Seconds from `after_s` (the end of an outage) until the throughput, averaged over
    /// `smoothing_s`, first stays at or above `fraction * baseline` for `hold_s` (see the module's
    /// definition); `None` when the run ends before that.
    pub fn time_to_fraction(
        &self,
        after_s: f64,
        baseline: f64,
        fraction: f64,
        smoothing_s: f64,
        hold_s: f64,
    ) -> Option<f64> {
        let b = self.bucket_s();
        let w = ((smoothing_s / b).round() as usize).max(1);
        let h = (hold_s / b).round() as usize;
        let n = self.full_buckets();
        let tp = self.throughput();
        let mut prefix = vec![0.0; n + 1];
        for i in 0..n {
            prefix[i + 1] = prefix[i] + tp[i];
        }
        // smoothed[i]: mean over buckets i..i+w, defined while they are all inside the run.
        let smoothed: Vec<f64> = (0..(n + 1).saturating_sub(w))
            .map(|i| (prefix[i + w] - prefix[i]) / w as f64)
            .collect();
        let target = fraction * baseline;
        let first = (after_s / b).floor().max(0.0) as usize;
        let mut run = 0usize;
        // Walk back from the end: run = how many consecutive smoothed values from i on are good.
        let mut good_from = vec![0usize; smoothed.len() + 1];
        for i in (0..smoothed.len()).rev() {
            run = if smoothed[i] >= target { run + 1 } else { 0 };
            good_from[i] = run;
        }
        (first..smoothed.len())
            .find(|&i| good_from[i] > h)
            .map(|i| (i as f64 * b - after_s).max(0.0))
    }

    /// Totals over the run.
    pub fn totals(&self) -> Bucket {
        let mut t = Bucket::default();
        for b in &self.buckets {
            t.merge(b);
        }
        t
    }

    /// `Keep` mode: whether every thread's original connection survived (see
    /// [`ConnectionReport::survived`]); `None` in `Reconnect` mode.
    pub fn connections_survived(&self) -> Option<bool> {
        match self.mode {
            Mode::Keep => Some(self.connections.iter().all(ConnectionReport::survived)),
            Mode::Reconnect => None,
        }
    }
}

fn median(v: &mut [f64]) -> Option<f64> {
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A synthetic run: `threads` threads each answering every `every_ms` over `[0, dur_ms)`,
    /// except inside `outages` (`(from_ms, to_ms)`) where each thread records an error at the
    /// outage start and answers again at its end; throughput scaled by `rate(t_ms)` (0..=1) by
    /// skipping answers.
    pub(crate) fn synthetic(
        dur_ms: u64,
        every_ms: u64,
        outages: &[(u64, u64)],
        rate: impl Fn(u64) -> f64,
        marks: &[(&str, u64)],
    ) -> Timeline {
        let threads = 2;
        let mut recs: Vec<Recorder> = (0..threads).map(|t| Recorder::new(t, 100_000)).collect();
        for (t, rec) in recs.iter_mut().enumerate() {
            let mut acc = 0.0;
            let mut ms = t as u64; // threads slightly apart
            while ms < dur_ms {
                if let Some(&(_, to)) = outages.iter().find(|(f, to)| ms >= *f && ms < *to) {
                    rec.record(ms * 1000, Outcome::Error);
                    ms = to;
                    continue;
                }
                acc += rate(ms);
                if acc >= 1.0 {
                    acc -= 1.0;
                    rec.record(ms * 1000, Outcome::Ok);
                }
                ms += every_ms;
            }
        }
        let marks = marks
            .iter()
            .map(|(l, ms)| Mark {
                label: (*l).into(),
                at_us: ms * 1000,
            })
            .collect();
        Timeline::from_recorders(recs, dur_ms * 1000, Mode::Reconnect, marks, vec![])
    }

    #[test]
    fn buckets_count_outcomes_and_answer_edges() {
        let mut r = Recorder::new(0, 100_000);
        r.record(10_000, Outcome::Ok);
        r.record(20_000, Outcome::Miss);
        r.record(30_000, Outcome::Wrong);
        r.record(250_000, Outcome::Error);
        r.record(260_000, Outcome::Error);
        r.record(420_000, Outcome::Ok);
        let mut r2 = Recorder::new(1, 100_000);
        r2.record(5_000, Outcome::Ok);
        r2.record(95_000, Outcome::Ok);
        let tl = Timeline::from_recorders(vec![r, r2], 450_000, Mode::Reconnect, vec![], vec![]);
        assert_eq!(tl.buckets.len(), 5);
        let b0 = &tl.buckets[0];
        assert_eq!((b0.ok, b0.miss, b0.wrong, b0.errors), (3, 1, 1, 0));
        assert_eq!(
            (b0.first_answer_us, b0.last_answer_us),
            (Some(5_000), Some(95_000))
        );
        assert_eq!(tl.buckets[2].errors, 2);
        assert_eq!(tl.buckets[1], Bucket::default());
        assert_eq!(
            tl.gaps,
            vec![Gap {
                thread: 0,
                start_us: 20_000,
                end_us: Some(420_000),
                errors: 2
            }]
        );
        let tp = tl.throughput();
        assert!((tp[0] - 40.0).abs() < 1e-9);
        // the last bucket covers 50 ms of the run
        assert!((tp[4] - 20.0).abs() < 1e-9, "{tp:?}");
        let t = tl.totals();
        assert_eq!((t.ok, t.miss, t.wrong, t.errors), (4, 1, 1, 2));
        assert_eq!(
            tl.answer_intervals(),
            vec![(0, Some(5_000)), (95_000, Some(420_000)), (420_000, None)]
        );
    }

    #[test]
    fn downtime_is_the_longest_silence_of_all_threads_overlapping_the_window() {
        // A 1.5 s outage at 5 s and a shorter one (0.8 s) at 12 s; the update at 4.9 s.
        let tl = synthetic(
            20_000,
            5,
            &[(5_000, 6_500), (12_000, 12_800)],
            |_| 1.0,
            &[("update-start", 4_900)],
        );
        let o = tl.downtime(4.9, tl.duration_s());
        assert!((o.secs - 1.5).abs() < 0.02, "{o:?}");
        assert!((o.start_s - 5.0).abs() < 0.02, "{o:?}");
        assert!((o.end_s.unwrap() - 6.5).abs() < 0.02, "{o:?}");
        // A window that only overlaps the second one.
        let o = tl.downtime(11.0, 13.0);
        assert!((o.secs - 0.8).abs() < 0.02, "{o:?}");
        // A window with no outage: the longest interval is a few ms.
        let o = tl.downtime(1.0, 2.0);
        assert!(o.secs < 0.01, "{o:?}");
    }

    #[test]
    fn an_outage_one_thread_rides_through_is_no_downtime() {
        let mut a = Recorder::new(0, 100_000);
        let mut b = Recorder::new(1, 100_000);
        for ms in (0..3_000).step_by(10) {
            b.record(ms * 1000, Outcome::Ok);
            if (1_000..2_000).contains(&ms) {
                a.record(ms * 1000, Outcome::Error);
            } else {
                a.record(ms * 1000, Outcome::Ok);
            }
        }
        let tl = Timeline::from_recorders(vec![a, b], 3_000_000, Mode::Reconnect, vec![], vec![]);
        assert!(tl.downtime(0.0, 3.0).secs < 0.02);
        assert_eq!(tl.gaps.len(), 1);
        assert_eq!(tl.gaps[0].end_us, Some(2_000_000));
    }

    #[test]
    fn an_outage_that_never_ends_runs_to_the_end() {
        let tl = synthetic(10_000, 5, &[(6_000, 99_000)], |_| 1.0, &[]);
        let o = tl.downtime(5.0, 10.0);
        assert_eq!(o.end_s, None);
        assert!((o.secs - 4.0).abs() < 0.02, "{o:?}");
        assert_eq!(tl.gaps.last().unwrap().end_us, None);
    }

    #[test]
    fn baseline_is_the_median_before_the_mark() {
        // 200 answers/s per thread (400/s) before 5 s, half after.
        let tl = synthetic(10_000, 5, &[], |ms| if ms < 5_000 { 1.0 } else { 0.5 }, &[]);
        let b = tl.baseline(5.0, 3.0).unwrap();
        assert!((b - 400.0).abs() < 1.0, "{b}");
        let after = tl.baseline(10.0, 3.0).unwrap();
        assert!((after - 200.0).abs() < 1.0, "{after}");
        assert_eq!(tl.baseline(0.05, 3.0), None);
    }

    #[test]
    fn recovery_to_90_percent_waits_for_a_sustained_return() {
        // Outage 5..6 s, then 50 % for 2 s, a blip back to 100 % for 0.3 s at 6.5 s, then 100 %
        // from 8 s: the 1 s window starting at 7.8 s is the first to average 90 % (0.2 s at 50 %,
        // 0.8 s at 100 %) and stays so: 1.8 s after the outage's end.
        let rate = |ms: u64| match ms {
            6_500..6_800 => 1.0,
            6_000..8_000 => 0.5,
            _ => 1.0,
        };
        let tl = synthetic(14_000, 5, &[(5_000, 6_000)], rate, &[]);
        let o = tl.downtime(4.0, 14.0);
        let end = o.end_s.unwrap();
        assert!((end - 6.0).abs() < 0.02);
        let base = tl.baseline(5.0, 4.0).unwrap();
        let t90 = tl.time_to_fraction(end, base, 0.9, 1.0, 1.0).unwrap();
        assert!((t90 - 1.8).abs() < 0.11, "{t90}");
        // Immediate return to full speed: (almost) zero.
        let tl = synthetic(14_000, 5, &[(5_000, 6_000)], |_| 1.0, &[]);
        let t90 = tl.time_to_fraction(6.0, base, 0.9, 1.0, 1.0).unwrap();
        assert!(t90 < 0.11, "{t90}");
        // Never back: None.
        let tl = synthetic(
            14_000,
            5,
            &[(5_000, 6_000)],
            |ms| if ms < 6_000 { 1.0 } else { 0.5 },
            &[],
        );
        assert_eq!(tl.time_to_fraction(6.0, base, 0.9, 1.0, 1.0), None);
    }

    #[test]
    fn keep_mode_survival() {
        let mut c = ConnectionReport {
            thread: 0,
            connects: 1,
            original_open: true,
            late_replies: 1,
            last_error_us: Some(5),
            last_answer_us: Some(9),
        };
        assert!(c.survived());
        c.last_answer_us = Some(4);
        assert!(!c.survived());
        c.last_answer_us = Some(9);
        c.original_open = false;
        assert!(!c.survived());
    }

    #[test]
    fn json_round_trip() {
        let tl = synthetic(2_000, 10, &[(500, 900)], |_| 1.0, &[("update-start", 400)]);
        let back: Timeline = serde_json::from_str(&serde_json::to_string(&tl).unwrap()).unwrap();
        assert_eq!(back, tl);
        assert_eq!(back.mark("update-start"), Some(0.4));
    }
}
