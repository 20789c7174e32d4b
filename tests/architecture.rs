//! The layering rules of ARCHITECTURE.md, checked from the source files themselves.
//!
//! Every `crate::`, `super::` and `self::` path in a file of `src/` (in `use` lines and in code)
//! is resolved to the module file it names; that gives a graph of files. A parent module's
//! references to its own direct children (declaring them, re-exporting them, merging their
//! routers) are part of being their parent and are left out; every other reference counts.
//! The graph must have no cycle, and the job engine must not reach into the domain.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use regex::Regex;

/// A module path, e.g. `["http", "jobs"]`; the crate root is empty.
type ModPath = Vec<String>;

struct Source {
    path: ModPath,
    text: String,
}

fn module_path(src: &Path, file: &Path) -> ModPath {
    let relative = file.strip_prefix(src).expect("file under src");
    let mut parts: ModPath = relative
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_owned())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts
}

fn sources(src: &Path) -> Vec<Source> {
    let mut files = Vec::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") && !path.ends_with("main.rs") {
                files.push(path);
            }
        }
    }
    files
        .into_iter()
        .map(|file| Source {
            path: module_path(src, &file),
            text: std::fs::read_to_string(&file).expect("read source"),
        })
        .collect()
}

/// Expands `a::{b, c::{d, e}}` (without the leading anchor) into `a::b`, `a::c::d`, `a::c::e`.
fn expand(tail: &str) -> Vec<String> {
    let Some(open) = tail.find('{') else {
        return vec![tail.trim().trim_end_matches("::").to_owned()];
    };
    let prefix = tail[..open].trim();
    let inner = &tail[open + 1..matching_brace(tail, open)];
    split_top_level(inner)
        .into_iter()
        .flat_map(expand)
        .map(|item| format!("{prefix}{item}"))
        .collect()
}

fn matching_brace(text: &str, open: usize) -> usize {
    let mut depth = 0;
    for (i, c) in text.char_indices().skip(open) {
        match c {
            '{' => depth += 1,
            '}' if depth == 1 => return i,
            '}' => depth -= 1,
            _ => {}
        }
    }
    text.len()
}

fn split_top_level(inner: &str) -> Vec<&str> {
    let (mut items, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&inner[start..]);
    items.into_iter().filter(|i| !i.trim().is_empty()).collect()
}

/// Every module-relative path the file mentions, made absolute.
fn referenced_paths(source: &Source) -> Vec<ModPath> {
    let anchored = Regex::new(r"\b(crate|super|self)((?:::(?:super|\w+))*)(::\{)?").unwrap();
    let mut paths = Vec::new();
    for m in anchored.captures_iter(&source.text) {
        if m[2].is_empty() && m.get(3).is_none() {
            continue; // `self.x`, `super::*` and the word "crate" name no module
        }
        let whole = m.get(0).unwrap();
        let tails = if m.get(3).is_some() {
            let open = whole.end() - 1;
            let close = matching_brace(&source.text, open);
            expand(&format!("{}::{{{}}}", &m[2], &source.text[open + 1..close]))
        } else {
            vec![m[2].to_owned()]
        };
        for tail in tails {
            paths.push(absolute(&source.path, &m[1], &tail));
        }
    }
    paths
}

fn absolute(current: &ModPath, anchor: &str, tail: &str) -> ModPath {
    let mut path = match anchor {
        "crate" => Vec::new(),
        "super" => current[..current.len().saturating_sub(1)].to_vec(),
        _ => current.clone(),
    };
    for segment in tail.split("::").map(str::trim).filter(|s| !s.is_empty()) {
        let segment = segment.split_whitespace().next().unwrap_or(segment);
        match segment {
            "super" => {
                path.pop();
            }
            "self" => {}
            other => path.push(other.to_owned()),
        }
    }
    path
}

/// The module file a path lands in: its longest prefix that is a module.
fn resolve<'a>(path: &ModPath, modules: &'a BTreeSet<ModPath>) -> &'a ModPath {
    (0..=path.len())
        .rev()
        .find_map(|n| modules.get(&path[..n].to_vec()))
        .expect("the crate root is a module")
}

fn file_graph(sources: &[Source]) -> BTreeMap<ModPath, BTreeSet<ModPath>> {
    let modules: BTreeSet<ModPath> = sources.iter().map(|s| s.path.clone()).collect();
    let mut graph = BTreeMap::new();
    for source in sources {
        let targets: BTreeSet<ModPath> = referenced_paths(source)
            .iter()
            .map(|p| resolve(p, &modules).clone())
            .filter(|target| *target != source.path)
            // A parent's own children are its business (see the module doc).
            .filter(|target| target[..target.len().saturating_sub(1)] != source.path[..])
            .collect();
        graph.insert(source.path.clone(), targets);
    }
    graph
}

/// A cycle in `graph`, if there is one (depth-first search).
fn find_cycle(graph: &BTreeMap<ModPath, BTreeSet<ModPath>>) -> Option<Vec<ModPath>> {
    fn visit(
        node: &ModPath,
        graph: &BTreeMap<ModPath, BTreeSet<ModPath>>,
        stack: &mut Vec<ModPath>,
        done: &mut BTreeSet<ModPath>,
    ) -> Option<Vec<ModPath>> {
        if let Some(at) = stack.iter().position(|n| n == node) {
            let mut cycle = stack[at..].to_vec();
            cycle.push(node.clone());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.clone());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, stack, done) {
                return Some(cycle);
            }
        }
        stack.pop();
        done.insert(node.clone());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

fn show(path: &ModPath) -> String {
    format!("crate::{}", path.join("::"))
}

/// `ARCH_SRC` points the checks at another tree (e.g. an old commit's `src`, to see them fail).
fn src_dir() -> PathBuf {
    std::env::var("ARCH_SRC")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("src"))
}

fn src_graph() -> BTreeMap<ModPath, BTreeSet<ModPath>> {
    file_graph(&sources(&src_dir()))
}

#[test]
fn no_import_cycle_between_files_of_src() {
    if let Some(cycle) = find_cycle(&src_graph()) {
        let shown: Vec<String> = cycle.iter().map(show).collect();
        panic!("import cycle: {}", shown.join(" -> "));
    }
}

#[test]
fn the_job_engine_knows_nothing_of_the_domain() {
    let forbidden = [
        "provision",
        "cloud",
        "domain",
        "repository",
        "http",
        "startup",
    ];
    for (file, targets) in src_graph()
        .iter()
        .filter(|(f, _)| f.first().is_some_and(|m| m == "jobs"))
    {
        for target in targets {
            let layer = target.first().map(String::as_str).unwrap_or("");
            assert!(
                !forbidden.contains(&layer),
                "{} uses {}: the job engine must stay generic",
                show(file),
                show(target)
            );
        }
    }
}

/// The longest a function of `src/` may be, from its `fn` line to its closing brace.
const MAX_FUNCTION_LINES: usize = 60;

/// Functions (file, name, lines) longer than `max`: a `fn` line starts one, the brace that
/// closes its first `{` ends it (doc comments and attributes are not counted).
fn long_functions(src: &Path, max: usize) -> Vec<(String, String, usize)> {
    let start =
        Regex::new(r"^\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?fn\s+(\w+)")
            .unwrap();
    let mut long = Vec::new();
    for source in sources(src) {
        let lines: Vec<&str> = source.text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let Some(m) = start.captures(line) else {
                continue;
            };
            let length = function_length(&lines[i..]);
            if length > max {
                long.push((show(&source.path), m[6].to_owned(), length));
            }
        }
    }
    long
}

fn function_length(lines: &[&str]) -> usize {
    let mut depth = 0i32;
    let mut opened = false;
    for (n, line) in lines.iter().enumerate() {
        depth += line.matches('{').count() as i32 - line.matches('}').count() as i32;
        opened |= line.contains('{');
        if (opened && depth <= 0) || (!opened && line.trim_end().ends_with(';')) {
            return n + 1;
        }
    }
    lines.len()
}

#[test]
fn no_function_in_src_is_over_60_lines() {
    let long = long_functions(&src_dir(), MAX_FUNCTION_LINES);
    assert!(
        long.is_empty(),
        "functions over {MAX_FUNCTION_LINES} lines (split them by concern): {long:?}"
    );
}

#[test]
fn the_checker_sees_grouped_imports_and_cycles() {
    assert_eq!(
        expand("a::{b, c::{d, e as f}}"),
        vec!["a::b", "a::c::d", "a::c::e as f"]
    );
    let node = |s: &str| vec![s.to_owned()];
    let mut graph = BTreeMap::new();
    graph.insert(node("a"), BTreeSet::from([node("b")]));
    graph.insert(node("b"), BTreeSet::from([node("a")]));
    assert!(find_cycle(&graph).is_some());
    graph.insert(node("b"), BTreeSet::new());
    assert!(find_cycle(&graph).is_none());
}
