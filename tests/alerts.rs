//! The alert rules and the Grafana dashboard: promtool checks and unit-tests the rules, and
//! every metric they use is one pgsluice registers.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn docs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs")
}

/// promtool, or `None` on a developer machine without it (CI installs it and must run it).
fn promtool() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("promtool"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool is missing: .ci/run installs it (Debian package prometheus)"
        );
        eprintln!("promtool not installed (apt-get install prometheus): skipping the rule tests");
    }
    found
}

fn run(promtool: &Path, args: &[&str]) {
    let out = Command::new(promtool)
        .args(args)
        .current_dir(docs().join("alerts"))
        .output()
        .expect("promtool runs");
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_checks_and_tests_the_rules() {
    let Some(promtool) = promtool() else { return };
    run(&promtool, &["check", "rules", "pgsluice.rules.yml"]);
    run(&promtool, &["test", "rules", "pgsluice.rules.test.yml"]);
}

/// Metric names in a PromQL expression (histogram series mapped to their base name).
fn metrics_in(expr: &str, registered: &BTreeSet<String>) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
        if word(bytes[i]) && (i == 0 || !word(bytes[i - 1])) {
            let start = i;
            while i < bytes.len() && word(bytes[i]) {
                i += 1;
            }
            let name = &expr[start..i];
            if name.starts_with("pgsluice_") || name.starts_with("process_") {
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .filter(|b| registered.contains(*b))
                    .unwrap_or(name);
                out.push(base.to_owned());
            }
        } else {
            i += 1;
        }
    }
    out
}

fn exprs(v: &serde_yaml::Value, out: &mut Vec<String>) {
    match v {
        serde_yaml::Value::Mapping(m) => {
            for (k, v) in m {
                if k.as_str() == Some("expr") {
                    if let Some(s) = v.as_str() {
                        out.push(s.to_owned());
                    }
                }
                exprs(v, out);
            }
        }
        serde_yaml::Value::Sequence(s) => s.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

#[test]
fn rules_and_dashboard_use_only_registered_metrics() {
    let registered: BTreeSet<String> = pgsluice::metrics::Metrics::new(10)
        .names()
        .iter()
        .cloned()
        .collect();
    for file in ["alerts/pgsluice.rules.yml", "grafana-dashboard.json"] {
        let text = std::fs::read_to_string(docs().join(file)).unwrap();
        // YAML 1.2 reads JSON too.
        let doc: serde_yaml::Value =
            serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
        let mut found = Vec::new();
        exprs(&doc, &mut found);
        assert!(
            found.len() >= 8,
            "{file}: expressions found: {}",
            found.len()
        );
        for e in &found {
            for m in metrics_in(e, &registered) {
                assert!(
                    registered.contains(&m),
                    "{file}: {m} is not a pgsluice metric (in {e})"
                );
            }
        }
    }
}

#[test]
fn every_alert_is_explained() {
    let rules = std::fs::read_to_string(docs().join("alerts/pgsluice.rules.yml")).unwrap();
    let readme = std::fs::read_to_string(docs().join("alerts/README.md")).unwrap();
    let tests = std::fs::read_to_string(docs().join("alerts/pgsluice.rules.test.yml")).unwrap();
    let mut n = 0;
    for line in rules.lines() {
        if let Some(name) = line.trim().strip_prefix("- alert: ") {
            n += 1;
            assert!(
                readme.contains(&format!("\n## {name}\n")),
                "README.md has no section for {name}"
            );
            assert!(
                tests.contains(&format!("alertname: {name}\n")),
                "{name} has no promtool test"
            );
        }
    }
    assert!(n >= 6, "alerts found: {n}");
}
