//! Whether a rotation could run now, found out without changing anything: an ACL the acting
//! user lacks, an idle user that may do less, an API key the account no longer knows or a state
//! directory that cannot be written would otherwise show only when the next rotation fails —
//! weeks later, perhaps in the middle of an incident that needs one at once.
//!
//! The checks run at start, every `rotation.preflight_interval`, and on
//! `POST /v1/rotate?dry_run=true`. The last report is in `/v1/status` (`rotation.preflight`)
//! and `rotaproxy_rotation_preflight_ok`; a change of verdict is logged.

use std::time::Duration;

use serde::Serialize;

/// When to look again after `report`: a failed preflight is looked at sooner (a sixtieth of the
/// interval, 1 s to 1 min), so that a failure that was passing (Redis restarting during the
/// check, the API busy) does not hold the gauge at 0, and an alert on it, for a whole
/// interval.
pub fn next_look(interval: Duration, report: &Report) -> Duration {
    if report.ok {
        interval
    } else {
        (interval / 60).clamp(Duration::from_secs(1), Duration::from_secs(60))
    }
}

/// What one check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok,
    Failed,
    /// The server or the API would not say; the rotation may still work.
    Unchecked,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Failed => "failed",
            Verdict::Unchecked => "unchecked",
        }
    }
}

/// One check: what was looked at, and what was found (never a secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub check: &'static str,
    pub result: Verdict,
    pub detail: String,
}

impl Check {
    pub fn ok(check: &'static str, detail: impl Into<String>) -> Check {
        Check {
            check,
            result: Verdict::Ok,
            detail: detail.into(),
        }
    }

    pub fn failed(check: &'static str, detail: impl Into<String>) -> Check {
        Check {
            check,
            result: Verdict::Failed,
            detail: detail.into(),
        }
    }

    pub fn unchecked(check: &'static str, detail: impl Into<String>) -> Check {
        Check {
            check,
            result: Verdict::Unchecked,
            detail: detail.into(),
        }
    }
}

/// Every check of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Unix seconds.
    #[serde(skip)]
    pub at: u64,
    pub ok: bool,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn new(at: u64, checks: Vec<Check>) -> Report {
        Report {
            at,
            ok: checks.iter().all(|c| c.result != Verdict::Failed),
            checks,
        }
    }

    /// The failed checks, as one line for the log.
    pub fn failures(&self) -> String {
        self.checks
            .iter()
            .filter(|c| c.result == Verdict::Failed)
            .map(|c| format!("{}: {}", c.check, c.detail))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// The report as status and the admin API show it.
    pub fn to_json(&self) -> serde_json::Value {
        let at = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(self.at);
        let mut report = serde_json::json!(self);
        report["at"] = humantime::format_rfc3339_seconds(at).to_string().into();
        report
    }

    /// Whether `other` says the same: the same checks with the same results, and failures for
    /// the same reasons (what passed may say something new, like the user a rotation made
    /// active, without that being news).
    pub fn same_verdict(&self, other: &Report) -> bool {
        let verdict = |r: &Report| -> Vec<(&'static str, Verdict, String)> {
            r.checks
                .iter()
                .map(|c| {
                    let why = if c.result == Verdict::Ok {
                        String::new()
                    } else {
                        c.detail.clone()
                    };
                    (c.check, c.result, why)
                })
                .collect()
        };
        verdict(self) == verdict(other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_fails_only_on_a_failed_check() {
        let report = Report::new(1, vec![Check::ok("a", ""), Check::unchecked("b", "NOPERM")]);
        assert!(report.ok);
        let report = Report::new(
            1,
            vec![
                Check::ok("a", ""),
                Check::failed("c", "no"),
                Check::failed("d", "nor this"),
            ],
        );
        assert!(!report.ok);
        assert_eq!(report.failures(), "c: no; d: nor this");
    }

    #[test]
    fn a_failed_preflight_is_looked_at_again_sooner() {
        let ok = Report::new(1, vec![Check::ok("a", "")]);
        let failed = Report::new(1, vec![Check::failed("a", "")]);
        let hour = Duration::from_secs(3600);
        assert_eq!(next_look(hour, &ok), hour);
        assert_eq!(next_look(hour, &failed), Duration::from_secs(60));
        assert_eq!(
            next_look(Duration::from_secs(120), &failed),
            Duration::from_secs(2)
        );
        assert_eq!(
            next_look(Duration::from_secs(5), &failed),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn news_is_a_result_or_a_reason_that_changed() {
        let report = |checks| Report::new(1, checks);
        let a = report(vec![
            Check::ok("x", "as app-a"),
            Check::failed("y", "NOPERM"),
        ]);
        let b = report(vec![
            Check::ok("x", "as app-b"),
            Check::failed("y", "NOPERM"),
        ]);
        assert!(a.same_verdict(&b));
        let c = report(vec![
            Check::ok("x", "as app-b"),
            Check::failed("y", "timeout"),
        ]);
        assert!(!b.same_verdict(&c));
        let d = report(vec![Check::ok("x", "as app-b"), Check::ok("y", "")]);
        assert!(!b.same_verdict(&d));
    }
}
