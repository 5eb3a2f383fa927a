//! The agent crate's map, checked: which module may import which. Read from
//! the sources (every `crate::…` and `super::…` path outside comments), so a
//! new import that ties two rooms together fails here, not in a review.
//!
//! The rules (README, "Architecture"):
//! - no import cycle between top-level modules, nor between the files of
//!   one module directory;
//! - replication (the source's protocol) and applier (the destination)
//!   never import each other; neither do migrate (source-side phases) and
//!   applier, nor stream and applier;
//! - transport is plumbing: it imports none of the modules whose calls it
//!   carries;
//! - config and connect import nothing they configure or serve;
//! - precheck reads both servers through connect, and the source's table
//!   selection from migrate, but drives nothing: it imports neither
//!   applier, replication, stream, transport nor metrics;
//! - alert reads config and metrics and drives nothing: it imports none
//!   of applier, migrate, replication, stream, transport;
//! - nothing imports task or cli, the layer on top, except cli itself.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level module → the top-level modules it imports.
type Graph = BTreeMap<String, BTreeSet<String>>;

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without its comments (line comments only: the crate
/// uses no block comments).
fn code(text: &str) -> String {
    text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// Every `prefix` path's first segment in `code`, like `applier` in
/// `crate::applier::apply`.
fn first_segments(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find(prefix) {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        if !name.is_empty() {
            out.insert(name);
        }
    }
    out
}

struct Crate {
    /// Top-level module → modules it imports.
    modules: Graph,
    /// Per module directory: file (sibling) → siblings it imports.
    siblings: BTreeMap<String, Graph>,
}

fn read_crate() -> Crate {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut modules = Graph::new();
    let mut siblings: BTreeMap<String, Graph> = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(&src).unwrap().with_extension("");
        let parts: Vec<String> = relative.iter().map(|p| p.to_string_lossy().into_owned()).collect();
        if parts == ["lib"] || parts == ["main"] {
            continue;
        }
        let module = parts[0].clone();
        let text = code(&std::fs::read_to_string(&file).unwrap());
        let used = modules.entry(module.clone()).or_default();
        used.extend(first_segments(&text, "crate::").into_iter().filter(|m| *m != module));
        // Files of a directory: `super::x` from a file names its sibling x.
        if parts.len() >= 2 && parts.last().is_some_and(|p| p != "mod") {
            let dir = parts[..parts.len() - 1].join("/");
            let me = parts.last().unwrap().clone();
            let graph = siblings.entry(dir).or_default();
            let found: BTreeSet<String> = first_segments(&text, "super::").into_iter().filter(|s| *s != me && *s != "super").collect();
            graph.entry(me).or_default().extend(found);
        }
    }
    // `super::name` may name an item of mod.rs rather than a sibling file.
    for (dir, graph) in siblings.iter_mut() {
        let files: BTreeSet<String> = graph.keys().cloned().collect();
        for used in graph.values_mut() {
            used.retain(|s| files.contains(s));
        }
        let _ = dir;
    }
    Crate { modules, siblings }
}

/// A cycle in `graph`, as the path around it, if there is one.
fn cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(node: &str, graph: &Graph, path: &mut Vec<String>, done: &mut BTreeSet<String>) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut found = path[at..].to_vec();
            found.push(node.to_owned());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

#[test]
fn the_reader_finds_imports_and_cycles() {
    let text = code("use crate::applier::apply::X;\n// crate::task is only mentioned\nlet y = my_crate::other; crate::connect::sql::q()");
    assert_eq!(first_segments(&text, "crate::"), BTreeSet::from(["applier".to_owned(), "connect".to_owned()]));
    let graph: Graph =
        [("a", "b"), ("b", "c"), ("c", "a")].into_iter().map(|(x, y)| (x.to_owned(), BTreeSet::from([y.to_owned()]))).collect();
    assert_eq!(cycle(&graph), Some(vec!["a".into(), "b".into(), "c".into(), "a".into()]));
    let acyclic: Graph = [("a", "b"), ("b", "c")].into_iter().map(|(x, y)| (x.to_owned(), BTreeSet::from([y.to_owned()]))).collect();
    assert_eq!(cycle(&acyclic), None);
}

#[test]
fn no_import_cycles() {
    let c = read_crate();
    assert!(c.modules.len() > 10, "the crate's modules were not found: {:?}", c.modules.keys());
    assert_eq!(cycle(&c.modules), None, "import cycle between modules");
    for (dir, graph) in &c.siblings {
        assert_eq!(cycle(graph), None, "import cycle between the files of {dir}");
    }
}

#[test]
fn each_module_imports_only_what_its_layer_may() {
    let c = read_crate();
    let never: &[(&str, &[&str])] = &[
        ("replication", &["applier", "migrate", "stream", "transport", "task", "cli"]),
        ("applier", &["replication", "migrate", "stream", "task", "cli"]),
        ("migrate", &["applier", "stream", "task", "cli"]),
        ("stream", &["applier", "migrate", "task", "cli"]),
        ("transport", &["applier", "migrate", "replication", "stream", "task", "cli"]),
        ("config", &["alert", "applier", "migrate", "replication", "stream", "transport", "connect", "task", "cli", "metrics"]),
        ("connect", &["applier", "migrate", "replication", "stream", "transport", "config", "task", "cli"]),
        ("precheck", &["applier", "replication", "stream", "transport", "task", "cli", "metrics"]),
        ("alert", &["applier", "migrate", "replication", "stream", "transport", "task", "cli"]),
    ];
    let mut broken = Vec::new();
    for (module, forbidden) in never {
        let used = c.modules.get(*module).unwrap_or_else(|| panic!("no module {module}"));
        for f in *forbidden {
            if used.contains(*f) {
                broken.push(format!("{module} imports {f}"));
            }
        }
    }
    for (module, used) in &c.modules {
        for top in ["task", "cli"] {
            if used.contains(top) && module != "cli" {
                broken.push(format!("{module} imports {top}, the layer on top"));
            }
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

/// Source files of every crate in the workspace (generated code aside; the
/// integration tests, lists of scenarios, are not counted).
#[test]
fn no_source_file_over_600_lines() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut files = Vec::new();
    for dir in ["agent/src", "proto/src", "decoder/src", "tests/src"] {
        sources(&root.join(dir), &mut files);
    }
    let long: Vec<String> = files
        .iter()
        .filter(|f| !f.components().any(|c| c.as_os_str() == "generated"))
        .filter_map(|f| {
            let lines = std::fs::read_to_string(f).unwrap().lines().count();
            (lines > 600).then(|| format!("{} ({lines} lines)", f.strip_prefix(root).unwrap().display()))
        })
        .collect();
    assert!(files.len() > 40, "the sources were not found");
    assert!(long.is_empty(), "split these by concern: {}", long.join(", "));
}
