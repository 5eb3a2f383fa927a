//! `scripts/monitoring/`: the Prometheus alert rules and the Grafana
//! dashboard parse, have the fields their tools need, and name only metrics
//! decant exports (`Metrics::render`). No server needed; `promtool check
//! rules` is run too when it is installed.

use std::collections::BTreeSet;
use std::path::PathBuf;

use decant_agent::metrics::Metrics;

fn monitoring() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/monitoring")
}

/// Every metric decant exports.
fn exported() -> BTreeSet<String> {
    Metrics::default().render().lines().filter_map(|l| l.strip_prefix("# TYPE ")).map(|l| l.split(' ').next().unwrap().to_owned()).collect()
}

/// The `decant_…` names in a PromQL expression.
fn metrics_in(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("decant_") {
        let before = rest[..at].chars().next_back();
        let name: String = rest[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        rest = &rest[at + name.len()..];
        // A label value such as instance=~"decant_x" is not a metric.
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '"') {
            out.push(name);
        }
    }
    out
}

fn check_exprs(what: &str, exprs: &[String]) {
    let exported = exported();
    assert!(exported.contains("decant_lag_seconds") && exported.contains("decant_retries_total"), "{exported:?}");
    let mut used = BTreeSet::new();
    for expr in exprs {
        let names = metrics_in(expr);
        assert!(!names.is_empty(), "{what}: {expr:?} names no decant metric");
        for name in names {
            assert!(exported.contains(&name), "{what}: {expr:?} uses {name}, which decant does not export (it has {exported:?})");
            used.insert(name);
        }
    }
    for needed in ["decant_lag_seconds", "decant_lag_bytes", "decant_retries_total"] {
        assert!(used.contains(needed), "{what} does not use {needed}");
    }
}

#[test]
fn alert_rules_parse_and_use_exported_metrics() {
    let path = monitoring().join("decant.rules.yml");
    let text = std::fs::read_to_string(&path).unwrap();
    let rules: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let groups = rules["groups"].as_sequence().expect("groups");
    assert!(!groups.is_empty());
    let mut exprs = Vec::new();
    let mut names = BTreeSet::new();
    for group in groups {
        assert!(group["name"].as_str().is_some(), "a group without a name");
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"].as_str().expect("every rule is an alert with a name");
            assert!(names.insert(name.to_owned()), "{name} twice");
            exprs.push(rule["expr"].as_str().unwrap_or_else(|| panic!("{name}: no expr")).to_owned());
            assert!(rule["annotations"]["summary"].as_str().is_some(), "{name}: no summary");
            assert!(rule["labels"]["severity"].as_str().is_some(), "{name}: no severity");
            if let Some(duration) = rule.get("for") {
                let d = duration.as_str().unwrap();
                assert!(d.ends_with(['s', 'm', 'h']) && d[..d.len() - 1].parse::<u32>().is_ok(), "{name}: for {d:?}");
            }
        }
    }
    check_exprs("decant.rules.yml", &exprs);
    // The real checker, where it is installed.
    if let Ok(out) = std::process::Command::new("promtool").arg("check").arg("rules").arg(&path).output() {
        assert!(out.status.success(), "promtool: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn the_dashboard_parses_and_uses_exported_metrics() {
    let text = std::fs::read_to_string(monitoring().join("grafana-dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(dashboard["title"].as_str().is_some() && dashboard["uid"].as_str().is_some());
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut exprs = Vec::new();
    for panel in panels {
        let title = panel["title"].as_str().expect("a panel title");
        assert!(ids.insert(panel["id"].as_u64().expect("a panel id")), "{title}: id used twice");
        for key in ["x", "y", "w", "h"] {
            assert!(panel["gridPos"][key].as_u64().is_some(), "{title}: gridPos.{key}");
        }
        let targets = panel["targets"].as_array().unwrap_or_else(|| panic!("{title}: no targets"));
        assert!(!targets.is_empty(), "{title}: no targets");
        for t in targets {
            exprs.push(t["expr"].as_str().unwrap_or_else(|| panic!("{title}: a target without expr")).to_owned());
        }
    }
    let titles: String = panels.iter().map(|p| p["title"].as_str().unwrap().to_lowercase()).collect::<Vec<_>>().join("|");
    for needed in ["lag (seconds)", "lag (bytes)", "rows applied per second", "full copy", "retries"] {
        assert!(titles.contains(needed), "no panel for {needed}: {titles}");
    }
    // Variables' queries name metrics too.
    for v in dashboard["templating"]["list"].as_array().unwrap() {
        if v["type"] == "query" {
            exprs.push(v["query"].as_str().unwrap().to_owned());
        }
    }
    check_exprs("grafana-dashboard.json", &exprs);
    assert!(exprs.iter().any(|e| e.contains("decant_copy_rows_total")), "no copy progress");
}
