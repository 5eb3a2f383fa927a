//! `scripts/kubernetes/decant-tasks.yaml`, the example of a migration
//! split into tasks on Kubernetes, read as Kubernetes and decant would:
//! each task's configuration loads, with its own task_id, slot and applier
//! port and tables no other task selects; each Deployment's command is
//! one decant accepts, naming its task's configuration; each agent reaches
//! its own task's applier through a Service.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use clap::Parser;
use decant_agent::cli::{Cli, Command};
use decant_agent::config::Config;
use serde::Deserialize;
use serde_yaml::Value;

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/kubernetes/decant-tasks.yaml");

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

/// Two table patterns select a table in common: equal, or one is the
/// other's whole schema. The example uses no other wildcard.
fn overlap(p: &str, q: &str) -> bool {
    let schema = |p: &str| p.strip_suffix(".*").map(str::to_owned);
    p == q || schema(p).is_some_and(|s| q.starts_with(&format!("{s}."))) || schema(q).is_some_and(|s| p.starts_with(&format!("{s}.")))
}

#[test]
fn the_kubernetes_example_runs_each_task_apart() {
    let text = std::fs::read_to_string(EXAMPLE).unwrap();
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&text).map(|d| Value::deserialize(d).unwrap()).collect();
    let of_kind = |kind: &'static str| docs.iter().filter(move |d| s(&d["kind"]) == kind);
    let dir = tempfile::tempdir().unwrap();

    // Each ConfigMap's task.toml is a task configuration.
    let mut files: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut configs: BTreeMap<String, Config> = BTreeMap::new();
    for map in of_kind("ConfigMap") {
        let name = s(&map["metadata"]["name"]).to_owned();
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, s(&map["data"]["task.toml"])).unwrap();
        let config = Config::load(Some(&path), &[]).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(name, format!("decant-{}", config.task_id), "a ConfigMap is named after its task");
        files.insert(name.clone(), path);
        configs.insert(name, config);
    }
    assert!(configs.len() >= 2, "the example splits a migration into tasks");
    let distinct = |what: &str, f: &dyn Fn(&Config) -> String| {
        let values: BTreeSet<String> = configs.values().map(f).collect();
        assert_eq!(values.len(), configs.len(), "every task needs its own {what}");
    };
    distinct("task_id", &|c| c.task_id.clone());
    distinct("slot", &|c| c.source.slot.clone());
    distinct("applier port", &|c| c.applier.listen.rsplit(':').next().unwrap().to_owned());
    let all: Vec<&Config> = configs.values().collect();
    for (i, a) in all.iter().enumerate() {
        assert!(!a.source.include_tables.is_empty(), "task {} selects every table", a.task_id);
        for b in &all[i + 1..] {
            for p in &a.source.include_tables {
                assert!(p.matches('*').count() == 0 || (p.ends_with(".*") && p.matches('*').count() == 1), "{p}");
                for q in &b.source.include_tables {
                    assert!(!overlap(p, q), "tasks {} and {} both select {p} / {q}", a.task_id, b.task_id);
                }
            }
            assert_eq!(a.destination.dsn, b.destination.dsn, "the tasks write into one destination");
        }
    }

    // Per task, one agent and one applier, each running a command decant
    // accepts, on its task's configuration.
    let mut roles: BTreeSet<(String, String)> = BTreeSet::new();
    for deployment in of_kind("Deployment") {
        let spec = &deployment["spec"];
        let labels = &spec["template"]["metadata"]["labels"];
        let (task, role) = (s(&labels["decant-task"]).to_owned(), s(&labels["decant-role"]).to_owned());
        assert_eq!(spec["replicas"].as_u64(), Some(1), "one {role} per task");
        assert_eq!(s(&spec["strategy"]["type"]), "Recreate", "never two {role}s of task {task} at once");
        let pod = &spec["template"]["spec"];
        let container = &pod["containers"][0];
        let command: Vec<String> = container["command"].as_sequence().unwrap().iter().map(|v| s(v).to_owned()).collect();
        assert_eq!(command[0], "decant");
        let cli = Cli::try_parse_from(&command).unwrap_or_else(|e| panic!("{command:?}: {e}"));
        let args = match (&cli.command, role.as_str()) {
            (Command::Agent(a), "agent") | (Command::Applier(a), "applier") => &a.role,
            _ => panic!("the {role} of task {task} runs {command:?}"),
        };
        // --config is the task's ConfigMap, mounted.
        let mount = container["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|m| args.config.starts_with(s(&m["mountPath"])))
            .unwrap_or_else(|| panic!("{} is not mounted", args.config.display()));
        let volume = pod["volumes"].as_sequence().unwrap().iter().find(|v| v["name"] == mount["name"]).unwrap();
        let map = s(&volume["configMap"]["name"]);
        assert_eq!(args.config.file_name().unwrap(), "task.toml");
        assert_eq!(map, format!("decant-{task}"), "the {role} of task {task} reads {map}");
        // The role's --set overrides apply to the task's configuration.
        let config = Config::load(Some(&files[map]), &args.overrides).unwrap_or_else(|e| panic!("{command:?}: {e}"));
        if role == "agent" {
            // https://<service>:<port>: the Service of this task's applier.
            let url = config.agent.applier_url.strip_prefix("https://").unwrap_or_else(|| panic!("{}", config.agent.applier_url));
            let (host, port) = url.split_once(':').unwrap();
            let service = of_kind("Service").find(|v| s(&v["metadata"]["name"]) == host).unwrap_or_else(|| panic!("no Service {host}"));
            assert_eq!(s(&service["spec"]["selector"]["decant-task"]), task);
            assert_eq!(s(&service["spec"]["selector"]["decant-role"]), "applier");
            assert_eq!(service["spec"]["ports"][0]["port"].as_u64().unwrap().to_string(), port);
            assert_eq!(config.applier.listen.rsplit(':').next().unwrap(), port, "the Service reaches the applier's port");
            assert!(!config.transport.tls_ca.is_empty(), "the agent checks the applier's certificate");
        } else {
            assert!(!config.transport.tls_cert.is_empty() && config.transport.tls_ca.is_empty(), "TLS without client certificates");
        }
        assert!(roles.insert((task, role)), "a second Deployment of one role");
    }
    let expected: BTreeSet<(String, String)> =
        configs.values().flat_map(|c| [(c.task_id.clone(), "agent".to_owned()), (c.task_id.clone(), "applier".to_owned())]).collect();
    assert_eq!(roles, expected);
}
