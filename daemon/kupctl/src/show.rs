//! `kupctl status` and `kupctl units`: kupd's reports as text.

use std::fmt::Write as _;

use kup_dbus::{DryRunReport, StatusReport, UnitReport};

/// A human summary of a status report, one `key  value` line per fact.
#[must_use]
pub fn status_text(status: &StatusReport) -> String {
    let mut rows: Vec<(&str, String)> = vec![
        ("kupd", status.daemon_version.clone()),
        ("running kernel", status.running_kernel.clone()),
        (
            "default target",
            status
                .default_target
                .clone()
                .unwrap_or_else(|| String::from("none (no newer kernel installed or staged)")),
        ),
        ("marked units", status.marked_units.to_string()),
    ];
    if let Some(handoff) = &status.restored_handoff {
        rows.push(("restored handoff", handoff.clone()));
    }
    rows.push((
        "update",
        match &status.active_update {
            Some(u) => format!(
                "to {} in phase {} ({}%), {}",
                u.target, u.phase, u.percentage, u.path
            ),
            None => String::from("none running"),
        },
    ));
    if let Some(last) = &status.last_update {
        let how = if last.success { "succeeded" } else { "failed" };
        rows.push((
            "last update",
            format!("to {} {how}: {}", last.target, last.message),
        ));
    }
    if let Some(h) = &status.last_handoff {
        rows.push((
            "last handoff",
            format!("{} on {}: {}", h.result, h.kernel, h.message),
        ));
    }
    for note in &status.notes {
        rows.push(("note", note.clone()));
    }
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (key, value) in rows {
        let _ = writeln!(out, "{key:<width$}  {value}");
    }
    out
}

/// A table of the marked units.
#[must_use]
pub fn units_text(units: &[UnitReport]) -> String {
    if units.is_empty() {
        return String::from(
            "no units are marked: add [[unit]] name = \"NAME.service\" to /etc/kup/kup.toml\n",
        );
    }
    let rows: Vec<(&str, bool, &str)> = units
        .iter()
        .map(|u| (u.name.as_str(), u.checkpointable, u.reason.as_str()))
        .collect();
    unit_table("CHECKPOINTABLE", &rows)
}

/// A `UNIT  YES/NO  REASON` table with `verdict` as the middle column's title.
fn unit_table(verdict: &str, rows: &[(&str, bool, &str)]) -> String {
    let name_w = rows
        .iter()
        .map(|r| r.0.len())
        .chain(["UNIT".len()])
        .max()
        .unwrap_or(0);
    let ok_w = verdict.len();
    let mut out = String::new();
    let _ = writeln!(out, "{:<name_w$}  {verdict:<ok_w$}  REASON", "UNIT");
    for (name, ok, reason) in rows {
        let ok = if *ok { "yes" } else { "no" };
        let line = format!("{name:<name_w$}  {ok:<ok_w$}  {reason}");
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

/// A dry-run report: the target, whether the update would be accepted, a unit table, and what was
/// not checked.
#[must_use]
pub fn dry_run_text(report: &DryRunReport) -> String {
    let mut out = format!("dry-run of an update to {}\n", report.target);
    if !report.refusal.is_empty() {
        let _ = writeln!(out, "the update would be refused: {}", report.refusal);
    }
    let rows: Vec<(&str, bool, &str)> = report
        .units
        .iter()
        .map(|u| (u.name.as_str(), u.restorable, u.reason.as_str()))
        .collect();
    out.push_str(&unit_table("RESTORABLE", &rows));
    if !report.vm.is_empty() {
        let _ = writeln!(out, "throwaway VM: {}", report.vm);
    }
    let _ = writeln!(out, "not checked: {}", report.not_checked);
    out
}

/// kupd's JSON, pretty-printed as it came (unknown fields kept).
#[must_use]
pub fn pretty_json(json: &str) -> String {
    serde_json::from_str::<serde_json::Value>(json)
        .and_then(|value| serde_json::to_string_pretty(&value))
        .unwrap_or_else(|_| json.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kup_dbus::{ActiveUpdate, FinishedUpdate};

    #[test]
    fn status_lists_the_facts_aligned() {
        let status = StatusReport {
            daemon_version: "0.1.0".into(),
            running_kernel: "6.12.107".into(),
            default_target: Some("7.3.4".into()),
            marked_units: 2,
            active_update: Some(ActiveUpdate {
                path: "/org/kup/Manager1/update/1".into(),
                target: "7.3.4".into(),
                phase: "dump".into(),
                percentage: 40,
            }),
            last_update: Some(FinishedUpdate {
                success: false,
                target: "7.3.3".into(),
                message: "no space".into(),
                ..FinishedUpdate::default()
            }),
            ..StatusReport::default()
        };
        let text = status_text(&status);
        assert!(text.contains("running kernel  6.12.107\n"), "{text}");
        assert!(
            text.contains(
                "update          to 7.3.4 in phase dump (40%), /org/kup/Manager1/update/1"
            ),
            "{text}"
        );
        assert!(
            text.contains("last update     to 7.3.3 failed: no space"),
            "{text}"
        );
    }

    #[test]
    fn units_are_a_table() {
        let units = [
            UnitReport {
                name: "memcached.service".into(),
                checkpointable: true,
                reason: String::new(),
            },
            UnitReport {
                name: "redis-server.service".into(),
                checkpointable: false,
                reason: "redis-server.service is not running: systemctl start redis-server".into(),
            },
        ];
        assert_eq!(
            units_text(&units),
            "UNIT                  CHECKPOINTABLE  REASON\n\
             memcached.service     yes\n\
             redis-server.service  no              redis-server.service is not running: systemctl start redis-server\n"
        );
    }

    #[test]
    fn no_units_says_how_to_mark_one() {
        assert!(units_text(&[]).contains("/etc/kup/kup.toml"));
    }

    #[test]
    fn json_is_pretty_printed_and_kept_when_invalid() {
        assert_eq!(pretty_json(r#"{"a":1}"#), "{\n  \"a\": 1\n}");
        assert_eq!(pretty_json("not json"), "not json");
    }
}
