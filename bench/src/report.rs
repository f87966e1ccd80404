//! The report: an environment header and a Markdown table per scenario (the format of
//! `docs/benchmarks.md`), and the same as JSON for machines.

use std::fmt::Write as _;
use std::process::Command;

use serde::Serialize;

use crate::scenario::{Row, ScenarioResult};
use crate::stats::Summary;

/// Where and how a run happened: the header of every report.
#[derive(Debug, Clone, Serialize)]
pub struct Environment {
    /// UTC date and time of the run.
    pub date: String,
    /// `git rev-parse --short HEAD` (plus `-dirty` when the tree has changes).
    pub commit: String,
    /// `uname -r`.
    pub kernel: String,
    /// CPU model from `/proc/cpuinfo`.
    pub cpu: String,
    /// Online CPUs.
    pub cores: usize,
    /// Version line of each peer tool (`not installed` when missing).
    pub peers: Vec<(String, String)>,
    /// The command line as run.
    pub command: String,
    /// Which CPUs the targets and the load ran on (`none`: not pinned).
    pub pinning: String,
}

impl Environment {
    /// Collects the environment now; `pinning` is [`crate::pinning::Pinning::describe`].
    pub fn collect(peers: Vec<(String, String)>, pinning: String) -> Self {
        let commit = match command_line("git", &["rev-parse", "--short", "HEAD"]) {
            Some(c) => {
                let dirty = command_line("git", &["status", "--porcelain"]).is_some();
                if dirty { format!("{c}-dirty") } else { c }
            }
            None => "none (no commit yet)".to_owned(),
        };
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or("unknown".to_owned(), |(_, m)| m.trim().to_owned());
        let args: Vec<String> = std::env::args().skip(1).map(|a| shell_quote(&a)).collect();
        Self {
            date: command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
                .unwrap_or_else(|| "unknown".to_owned()),
            commit,
            kernel: command_line("uname", &["-r"]).unwrap_or_else(|| "unknown".to_owned()),
            cpu,
            cores: std::thread::available_parallelism().map_or(0, usize::from),
            peers,
            command: format!("outrelay-bench {}", args.join(" ")),
            pinning,
        }
    }
}

/// The run as Markdown: header list, table, notes.
pub fn render_markdown(env: &Environment, result: &ScenarioResult) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "### {}\n", result.scenario);
    let _ = writeln!(out, "- date: {}", env.date);
    let _ = writeln!(out, "- commit: {}", env.commit);
    let _ = writeln!(out, "- kernel: {}", env.kernel);
    let _ = writeln!(out, "- CPU: {} ({} cores)", env.cpu, env.cores);
    let peers: Vec<String> = env
        .peers
        .iter()
        .map(|(n, v)| format!("{n}: `{v}`"))
        .collect();
    let _ = writeln!(out, "- peers: {}", peers.join("; "));
    let _ = writeln!(out, "- command: `{}`", env.command);
    let _ = writeln!(out, "- pinning: {}", env.pinning);
    let _ = writeln!(
        out,
        "- {} round(s), targets interleaved within each round; cells are median (min-max) over \
         rounds\n",
        result.rounds
    );

    let (setups, paths) = shown_labels(result);
    let mut header = vec!["target"];
    if setups {
        header.push("setup");
    }
    if paths {
        header.push("path");
    }
    header.push("variant");
    let labels = header.len();
    header.extend(result.columns.iter().map(|c| c.header));
    let _ = writeln!(out, "| {} |", header.join(" | "));
    let align: Vec<&str> = header
        .iter()
        .enumerate()
        .map(|(i, _)| if i < labels { "---" } else { "---:" })
        .collect();
    let _ = writeln!(out, "|{}|", align.join("|"));
    for row in &result.rows {
        let _ = writeln!(
            out,
            "| {} |",
            row_cells(result, row, setups, paths).join(" | ")
        );
    }
    if !result.notes.is_empty() {
        out.push('\n');
        for note in &result.notes {
            let _ = writeln!(out, "- {note}");
        }
    }
    out
}

/// The run as JSON: environment, settings, summarised rows and every sample.
pub fn to_json(env: &Environment, result: &ScenarioResult) -> serde_json::Result<String> {
    #[derive(Serialize)]
    struct Doc<'a> {
        environment: &'a Environment,
        result: &'a ScenarioResult,
    }
    serde_json::to_string_pretty(&Doc {
        environment: env,
        result,
    })
}

/// `median (min-max)`, or just the median when all rounds agree to the shown precision.
pub fn format_summary(s: &Summary, decimals: usize) -> String {
    let median = format!("{:.*}", decimals, s.median);
    let (min, max) = (
        format!("{:.*}", decimals, s.min),
        format!("{:.*}", decimals, s.max),
    );
    if min == max {
        median
    } else {
        format!("{median} ({min}-{max})")
    }
}

/// Whether the table needs a setup column and a path column (some row has one).
fn shown_labels(result: &ScenarioResult) -> (bool, bool) {
    (
        result.rows.iter().any(|r| !r.setup.is_empty()),
        result.rows.iter().any(|r| !r.path.is_empty()),
    )
}

fn row_cells(result: &ScenarioResult, row: &Row, setups: bool, paths: bool) -> Vec<String> {
    let mut cells = vec![row.target.clone()];
    if let Some(status) = &row.status {
        cells.push(status.clone());
        let labels = usize::from(setups) + usize::from(paths);
        cells.extend((0..labels + result.columns.len()).map(|_| String::new()));
        return cells;
    }
    if setups {
        cells.push(row.setup.clone());
    }
    if paths {
        cells.push(row.path.clone());
    }
    cells.push(row.variant.clone());
    for c in &result.columns {
        let cell = row
            .cells
            .get(&c.value.key())
            .map_or("–".to_owned(), |s| format_summary(s, c.decimals));
        cells.push(cell);
    }
    cells
}

/// The trimmed stdout of a command that succeeded with non-empty output.
fn command_line(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !text.is_empty()).then_some(text)
}

fn shell_quote(arg: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_=,./:".contains(c);
    if !arg.is_empty() && arg.chars().all(plain) {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::scenario::{Column, Settings, Value};

    fn env() -> Environment {
        Environment {
            date: "2026-01-02 03:04 UTC".to_owned(),
            commit: "abc1234".to_owned(),
            kernel: "6.1.0-test".to_owned(),
            cpu: "Test CPU".to_owned(),
            cores: 2,
            peers: vec![("haproxy".to_owned(), "HAProxy version 2.6.12".to_owned())],
            command: "outrelay-bench run bulk --targets direct,haproxy".to_owned(),
            pinning: "none".to_owned(),
        }
    }

    fn summary(median: f64, min: f64, max: f64) -> Summary {
        Summary {
            median,
            min,
            max,
            samples: 3,
        }
    }

    #[test]
    fn summaries_show_the_range_only_when_rounds_differ() {
        assert_eq!(
            format_summary(&summary(20.04, 19.5, 21.25), 1),
            "20.0 (19.5-21.2)"
        );
        assert_eq!(format_summary(&summary(1.0, 1.0, 1.0), 2), "1.00");
        assert_eq!(format_summary(&summary(1.001, 0.999, 1.004), 2), "1.00");
    }

    #[test]
    fn markdown_has_header_table_and_status_rows() {
        let result = ScenarioResult {
            scenario: "bulk".to_owned(),
            rounds: 3,
            settings: Settings::example(),
            columns: vec![
                Column {
                    header: "Gbit/s",
                    decimals: 1,
                    value: Value::Metric("gbps"),
                },
                Column {
                    header: "x direct",
                    decimals: 2,
                    value: Value::RatioToDirect("gbps"),
                },
            ],
            rows: vec![
                Row {
                    target: "direct".to_owned(),
                    setup: String::new(),
                    path: String::new(),
                    variant: "1 stream".to_owned(),
                    cells: BTreeMap::from([
                        ("gbps".to_owned(), summary(21.0, 20.0, 22.0)),
                        ("gbps_ratio_to_direct".to_owned(), summary(1.0, 1.0, 1.0)),
                    ]),
                    status: None,
                },
                Row {
                    target: "socat".to_owned(),
                    setup: String::new(),
                    path: String::new(),
                    variant: "1 stream".to_owned(),
                    cells: BTreeMap::from([("gbps".to_owned(), summary(5.0, 5.0, 5.0))]),
                    status: None,
                },
                Row {
                    target: "outrelay".to_owned(),
                    setup: String::new(),
                    path: String::new(),
                    variant: String::new(),
                    cells: BTreeMap::new(),
                    status: Some("not available (relay not built yet)".to_owned()),
                },
            ],
            samples: Vec::new(),
            notes: vec!["a note".to_owned()],
        };
        let md = render_markdown(&env(), &result);
        let expected = "\
### bulk

- date: 2026-01-02 03:04 UTC
- commit: abc1234
- kernel: 6.1.0-test
- CPU: Test CPU (2 cores)
- peers: haproxy: `HAProxy version 2.6.12`
- command: `outrelay-bench run bulk --targets direct,haproxy`
- pinning: none
- 3 round(s), targets interleaved within each round; cells are median (min-max) over rounds

| target | variant | Gbit/s | x direct |
|---|---|---:|---:|
| direct | 1 stream | 21.0 (20.0-22.0) | 1.00 |
| socat | 1 stream | 5.0 | – |
| outrelay | not available (relay not built yet) |  |  |

- a note
";
        assert_eq!(md, expected);
        let json = to_json(&env(), &result).expect("serialisable");
        let doc: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
        assert_eq!(doc["result"]["rows"][0]["cells"]["gbps"]["median"], 21.0);
        assert_eq!(doc["environment"]["commit"], "abc1234");
    }

    #[test]
    fn setup_and_path_columns_appear_when_a_row_has_them_and_status_rows_stay_aligned() {
        let row = |target: &str, setup: &str, path: &str, status: Option<&str>| Row {
            target: target.to_owned(),
            setup: setup.to_owned(),
            path: path.to_owned(),
            variant: if status.is_some() { "" } else { "c=32" }.to_owned(),
            cells: BTreeMap::from([("conn_per_s".to_owned(), summary(5.0, 5.0, 5.0))]),
            status: status.map(str::to_owned),
        };
        let result = ScenarioResult {
            scenario: "connrate".to_owned(),
            rounds: 1,
            settings: Settings::example(),
            columns: vec![Column {
                header: "conn/s",
                decimals: 0,
                value: Value::Metric("conn_per_s"),
            }],
            rows: vec![
                row("direct", "", "tcp", None),
                row("outrelay", "w=2", "sni", None),
                row(
                    "rathole",
                    "",
                    "",
                    Some("not available (rathole not installed)"),
                ),
            ],
            samples: Vec::new(),
            notes: Vec::new(),
        };
        let md = render_markdown(&env(), &result);
        assert!(
            md.contains("| target | setup | path | variant | conn/s |"),
            "{md}"
        );
        assert!(md.contains("| direct |  | tcp | c=32 | 5 |"), "{md}");
        assert!(md.contains("| outrelay | w=2 | sni | c=32 | 5 |"), "{md}");
        let table: Vec<&str> = md.lines().filter(|l| l.starts_with('|')).collect();
        assert_eq!(table.len(), 5, "{md}");
        for line in &table {
            assert_eq!(line.matches('|').count(), 6, "{line}");
        }
    }

    #[test]
    fn arguments_are_quoted_only_when_needed() {
        assert_eq!(shell_quote("--targets"), "--targets");
        assert_eq!(shell_quote("direct,haproxy"), "direct,haproxy");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
