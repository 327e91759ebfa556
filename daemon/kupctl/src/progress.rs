//! Showing an update's progress: a bar on a terminal, plain lines otherwise.

use std::fmt;
use std::io::{IsTerminal as _, Write};

use indicatif::{ProgressBar, ProgressStyle};

/// Percentage steps between two plain progress lines of the same phase.
const LINE_STEP: u32 = 10;

/// Where progress goes.
pub struct Reporter {
    mode: Mode,
    last: Option<(String, u32)>,
}

enum Mode {
    Bar(ProgressBar),
    Lines(Box<dyn Write + Send>),
    Json(Box<dyn Write + Send>),
}

impl fmt::Debug for Reporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match self.mode {
            Mode::Bar(_) => "bar",
            Mode::Lines(_) => "lines",
            Mode::Json(_) => "json",
        };
        f.debug_struct("Reporter")
            .field("mode", &mode)
            .field("last", &self.last)
            .finish()
    }
}

impl Reporter {
    /// A bar when stdout is a terminal, plain lines on stdout otherwise (journal, pipes).
    #[must_use]
    pub fn for_stdout() -> Self {
        if std::io::stdout().is_terminal() {
            let bar = ProgressBar::new(100);
            if let Ok(style) = ProgressStyle::with_template("{msg:>10} [{wide_bar}] {pos:>3}%") {
                bar.set_style(style.progress_chars("=> "));
            }
            Self {
                mode: Mode::Bar(bar),
                last: None,
            }
        } else {
            Self::lines(std::io::stdout())
        }
    }

    /// Plain lines into `out`.
    #[must_use]
    pub fn lines(out: impl Write + Send + 'static) -> Self {
        Self {
            mode: Mode::Lines(Box::new(out)),
            last: None,
        }
    }

    /// One JSON object per line into `out` (`kupctl update --json`): `{"note": ...}`,
    /// `{"phase": ..., "percentage": ...}` on every report, and last
    /// `{"finished": true, "success": ..., "message": ...}`.
    #[must_use]
    pub fn json(out: impl Write + Send + 'static) -> Self {
        Self {
            mode: Mode::Json(Box::new(out)),
            last: None,
        }
    }

    fn json_line(&mut self, value: &serde_json::Value) {
        if let Mode::Json(out) = &mut self.mode {
            let _ = writeln!(out, "{value}");
            let _ = out.flush();
        }
    }

    /// The end of an update as the last JSON line (only in JSON mode; the others show errors
    /// on stderr).
    pub fn json_result(&mut self, success: bool, message: &str) {
        self.json_line(
            &serde_json::json!({"finished": true, "success": success, "message": message}),
        );
    }

    /// Prints a line above the bar (or as a line).
    pub fn note(&mut self, text: &str) {
        if matches!(self.mode, Mode::Json(_)) {
            self.json_line(&serde_json::json!({ "note": text }));
            return;
        }
        match &mut self.mode {
            Mode::Json(_) => {}
            Mode::Bar(bar) => bar.println(text),
            Mode::Lines(out) => {
                // Progress output is best effort: a closed stdout must not fail the update.
                let _ = writeln!(out, "{text}");
                let _ = out.flush();
            }
        }
    }

    /// Shows that the update is in `phase` at `percentage`.
    pub fn progress(&mut self, phase: &str, percentage: u32) {
        let percentage = percentage.min(100);
        if matches!(self.mode, Mode::Json(_)) {
            self.json_line(&serde_json::json!({"phase": phase, "percentage": percentage}));
            return;
        }
        let show = match &self.last {
            None => true,
            Some((last_phase, last_pct)) => {
                last_phase != phase
                    || percentage >= last_pct.saturating_add(LINE_STEP)
                    || (percentage == 100 && *last_pct != 100)
            }
        };
        match &mut self.mode {
            Mode::Bar(bar) => {
                bar.set_message(phase.to_owned());
                bar.set_position(u64::from(percentage));
            }
            Mode::Json(_) => {}
            Mode::Lines(out) => {
                if show {
                    let _ = writeln!(out, "{phase:>10} {percentage:>3}%");
                    let _ = out.flush();
                }
            }
        }
        if show {
            self.last = Some((phase.to_owned(), percentage));
        }
    }

    /// Ends the display (the bar disappears) and prints `text`.
    pub fn finish(&mut self, text: &str) {
        if let Mode::Bar(bar) = &self.mode {
            bar.finish_and_clear();
        }
        if matches!(self.mode, Mode::Json(_)) {
            self.json_result(true, text);
            return;
        }
        match &mut self.mode {
            Mode::Json(_) => {}
            Mode::Bar(_) => println!("{text}"),
            Mode::Lines(out) => {
                let _ = writeln!(out, "{text}");
                let _ = out.flush();
            }
        }
    }

    /// Ends the display without a message (before an error is shown).
    pub fn abandon(&mut self) {
        if let Mode::Bar(bar) = &self.mode {
            bar.abandon();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_mode_writes_one_object_per_event() {
        let buf = Buf::default();
        let mut reporter = Reporter::json(buf.clone());
        reporter.note("updating");
        reporter.progress("dump", 40);
        reporter.progress("dump", 41);
        reporter.finish("done");
        let text = String::from_utf8(buf.0.lock().expect("lock").clone()).expect("utf8");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert_eq!(lines[0]["note"], "updating");
        assert_eq!(lines[2]["percentage"], 41);
        assert_eq!(lines[3]["success"], true);
        assert_eq!(lines[3]["message"], "done");
    }

    #[test]
    fn plain_lines_show_phase_changes_and_big_steps_only() {
        let buf = Buf::default();
        let mut reporter = Reporter::lines(buf.clone());
        for (phase, pct) in [
            ("stage", 0),
            ("stage", 3),
            ("preflight", 5),
            ("preflight", 14),
            ("preflight", 15),
            ("dump", 90),
            ("dump", 100),
        ] {
            reporter.progress(phase, pct);
        }
        reporter.finish("done");
        let text = String::from_utf8(buf.0.lock().expect("lock").clone()).expect("utf8");
        assert_eq!(
            text,
            "     stage   0%\n preflight   5%\n preflight  15%\n      dump  90%\n      dump 100%\ndone\n"
        );
    }
}
