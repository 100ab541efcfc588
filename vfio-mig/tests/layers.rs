// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! No import cycles between the library's modules.
//!
//! Reads every file under `src/`, collects the paths it names (`crate::a::...`,
//! `crate::{a, b}`, `super::x` and `self::x`, in `use` items and inline), and builds two
//! graphs: one between the top-level modules (`device`, `engine`, `stream`, ...), and one
//! per top-level module between its submodules (`engine::save`, `engine::multi`, ...). A path
//! to an item a `mod.rs` (or `lib.rs`) re-exports counts as a path to the module that defines
//! it; a facade's re-exports of its own submodules make no edge. Then a depth-first search
//! looks for a cycle in each graph and prints it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// One source file: its top-level module, its submodule (None for `mod.rs`/a flat file) and
/// its text with comments removed.
struct Source {
    top: String,
    sub: Option<String>,
    is_facade: bool,
    code: String,
}

fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_block = false;
    for line in text.lines() {
        let mut l = line;
        if in_block {
            match l.find("*/") {
                Some(i) => {
                    l = &l[i + 2..];
                    in_block = false;
                }
                None => continue,
            }
        }
        // Cut a line comment that is not inside a string literal.
        let mut cut = l.len();
        let mut in_str = false;
        let bytes = l.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'\\' if in_str => i += 1,
                b'"' => in_str = !in_str,
                b'/' if !in_str && bytes.get(i + 1) == Some(&b'/') => {
                    cut = i;
                    break;
                }
                b'/' if !in_str && bytes.get(i + 1) == Some(&b'*') => {
                    cut = i;
                    in_block = !l[i..].contains("*/");
                    break;
                }
                _ => {}
            }
            i += 1;
        }
        out.push_str(&l[..cut]);
        out.push('\n');
    }
    out
}

fn sources(src: &Path) -> Vec<Source> {
    let mut out = Vec::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("rs") {
                continue;
            }
            let rel: Vec<String> = path
                .strip_prefix(src)
                .unwrap()
                .with_extension("")
                .iter()
                .map(|c| c.to_string_lossy().into_owned())
                .collect();
            let code = strip_comments(&fs::read_to_string(&path).unwrap());
            let (top, sub, is_facade) = match rel.as_slice() {
                [root] if root == "lib" => (String::new(), None, true),
                [flat] => (flat.clone(), None, false),
                [top, m] if m == "mod" => (top.clone(), None, true),
                [top, sub, ..] => (top.clone(), Some(sub.clone()), false),
                _ => unreachable!(),
            };
            out.push(Source {
                top,
                sub,
                is_facade,
                code,
            });
        }
    }
    out
}

fn ident(s: &str) -> Option<(&str, &str)> {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    (end > 0).then(|| (&s[..end], &s[end..]))
}

/// The first path segment (or, for a `{...}` group, each item's first segment and, when an
/// item has one, its second) after a `crate::`/`super::`/`self::` at `rest`.
fn heads(rest: &str) -> Vec<(String, Option<String>)> {
    let rest = rest.trim_start();
    if let Some(group) = rest.strip_prefix('{') {
        let mut depth = 1;
        let mut end = group.len();
        for (i, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = i;
                        break;
                    }
                }
                _ => {}
            }
        }
        let body = &group[..end];
        let mut items = Vec::new();
        let mut depth = 0;
        let mut start = 0;
        for (i, c) in body.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    items.push(&body[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        items.push(&body[start..]);
        return items
            .into_iter()
            .filter_map(|item| one_head(item.trim()))
            .collect();
    }
    one_head(rest).into_iter().collect()
}

fn one_head(s: &str) -> Option<(String, Option<String>)> {
    let (first, tail) = ident(s)?;
    let second = tail
        .strip_prefix("::")
        .and_then(|t| ident(t.trim_start()))
        .map(|(n, _)| n.to_string());
    Some((first.to_string(), second))
}

/// Occurrences of `word::` not preceded by an identifier character.
fn after<'a>(code: &'a str, word: &str) -> Vec<&'a str> {
    let pat = format!("{word}::");
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = code[from..].find(&pat) {
        let at = from + i;
        let before = code[..at].chars().next_back();
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.push(&code[at + pat.len()..]);
        }
        from = at + pat.len();
    }
    out
}

/// Names re-exported by a facade (`pub use m::{A, B}` / `pub use m::A`, or `pub(crate) use`):
/// name -> module.
fn reexports(code: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for stmt in code.split(';') {
        let s = stmt.trim();
        let Some(path) = ["pub use ", "pub(crate) use "]
            .iter()
            .find_map(|p| s.strip_prefix(p))
        else {
            continue;
        };
        let path = path.trim_start_matches("self::");
        let Some((module, tail)) = ident(path) else {
            continue;
        };
        let tail = tail.trim_start_matches("::");
        let names: Vec<&str> = match tail.strip_prefix('{') {
            Some(g) => g.trim_end_matches('}').split(',').collect(),
            None => vec![tail],
        };
        for n in names {
            let n = n.trim();
            let n = n.rsplit("::").next().unwrap_or(n);
            let n = n.split(" as ").last().unwrap_or(n).trim();
            if !n.is_empty() {
                map.insert(n.to_string(), module.to_string());
            }
        }
    }
    map
}

fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        path.push(n.to_string());
        for m in g.get(n).into_iter().flatten() {
            match state.get(m.as_str()).copied().unwrap_or(0) {
                1 => {
                    let at = path.iter().position(|p| p == m).unwrap();
                    let mut c = path[at..].to_vec();
                    c.push(m.clone());
                    return Some(c);
                }
                0 => {
                    if let Some(c) = visit(m, g, state, path) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        path.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(n, graph, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

/// The two kinds of graphs: top-level, and per top-level module its submodules.
fn graphs(src: &Path) -> (Graph, BTreeMap<String, Graph>) {
    let files = sources(src);
    let tops: BTreeSet<String> = files.iter().map(|f| f.top.clone()).collect();
    let subs: BTreeMap<String, BTreeSet<String>> = files
        .iter()
        .filter_map(|f| f.sub.clone().map(|s| (f.top.clone(), s)))
        .fold(BTreeMap::new(), |mut m, (t, s)| {
            m.entry(t).or_insert_with(BTreeSet::new).insert(s);
            m
        });
    let facades: BTreeMap<String, BTreeMap<String, String>> = files
        .iter()
        .filter(|f| f.is_facade)
        .map(|f| (f.top.clone(), reexports(&f.code)))
        .collect();
    let mut top_graph = Graph::new();
    let mut sub_graphs: BTreeMap<String, Graph> = BTreeMap::new();
    for f in &files {
        // A facade's re-exports of its own submodules make no edge; what else it names
        // (another top-level module's items it re-exports included) does.
        let code: String = if f.is_facade {
            f.code
                .split_inclusive(';')
                .filter(|s| {
                    let s = s.trim_start();
                    match ["pub use ", "pub(crate) use "]
                        .iter()
                        .find_map(|p| s.strip_prefix(p))
                    {
                        Some(path) => path.starts_with("crate::"),
                        None => true,
                    }
                })
                .collect()
        } else {
            f.code.clone()
        };
        let me = f.sub.clone().unwrap_or_else(|| "mod".into());
        let children = subs.get(&f.top).cloned().unwrap_or_default();
        let resolve_child = |name: &str| -> String {
            if children.contains(name) {
                name.to_string()
            } else {
                facades
                    .get(&f.top)
                    .and_then(|r| r.get(name))
                    .filter(|m| children.contains(*m))
                    .cloned()
                    .unwrap_or_else(|| "mod".into())
            }
        };
        let mut add_sub = |to: String| {
            if to != me {
                sub_graphs
                    .entry(f.top.clone())
                    .or_default()
                    .entry(me.clone())
                    .or_default()
                    .insert(to);
            }
        };
        for rest in after(&code, "crate") {
            for (first, second) in heads(rest) {
                let target = if tops.contains(&first) {
                    first.clone()
                } else if let Some(m) = facades.get("").and_then(|r| r.get(&first)) {
                    m.clone()
                } else {
                    continue;
                };
                if target == f.top {
                    if let Some(s) = second {
                        add_sub(resolve_child(&s));
                    }
                } else if !f.top.is_empty() {
                    top_graph.entry(f.top.clone()).or_default().insert(target);
                }
            }
        }
        let local = if f.sub.is_some() { "super" } else { "self" };
        if !f.top.is_empty() {
            for rest in after(&code, local) {
                for (first, _) in heads(rest) {
                    add_sub(resolve_child(&first));
                }
            }
        }
    }
    (top_graph, sub_graphs)
}

type Graph = BTreeMap<String, BTreeSet<String>>;

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn no_cycle_between_top_level_modules() {
    let (top, _) = graphs(&src_dir());
    assert!(top.len() > 5, "the parser found the modules: {top:?}");
    // The edges, for docs/architecture.md (`cargo test --test layers -- --nocapture`).
    for (from, to) in &top {
        println!(
            "{from} -> {}",
            to.iter().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    if let Some(c) = cycle(&top) {
        panic!("import cycle: {}\nedges: {top:#?}", c.join(" -> "));
    }
}

#[test]
fn no_cycle_between_submodules() {
    let (_, subs) = graphs(&src_dir());
    assert!(
        subs.contains_key("engine"),
        "engine's submodules were found"
    );
    for (module, g) in &subs {
        for (from, to) in g {
            println!(
                "{module}::{from} -> {}",
                to.iter().cloned().collect::<Vec<_>>().join(", ")
            );
        }
        if let Some(c) = cycle(g) {
            panic!(
                "import cycle in {module}: {}\nedges: {g:#?}",
                c.join(" -> ")
            );
        }
    }
}

#[test]
fn the_cycle_search_finds_cycles() {
    let g: Graph = [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")]
        .into_iter()
        .fold(Graph::new(), |mut g, (x, y)| {
            g.entry(x.into()).or_default().insert(y.into());
            g
        });
    assert_eq!(cycle(&g).unwrap(), ["a", "b", "c", "a"]);
    let mut acyclic = g.clone();
    acyclic.get_mut("c").unwrap().remove("a");
    assert_eq!(cycle(&acyclic), None);
}

#[test]
fn paths_are_parsed_from_use_groups_and_inline_code() {
    let code = strip_comments(
        "use crate::{engine::save, stream::{Reader, Writer}};\n\
         // use crate::fence::x;\n\
         let s = \"//\"; crate::v2::feature::probe(d);\n\
         use super::multi::Group;",
    );
    let crate_heads: Vec<_> = after(&code, "crate").into_iter().flat_map(heads).collect();
    let firsts: Vec<&str> = crate_heads.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(firsts, ["engine", "stream", "v2"]);
    assert_eq!(crate_heads[0].1.as_deref(), Some("save"));
    let sup: Vec<_> = after(&code, "super").into_iter().flat_map(heads).collect();
    assert_eq!(sup[0].0, "multi");
}
