// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! docs/architecture.md against the code: its crate table has one row per workspace crate, with
//! the crate's path and exactly its (normal) dependencies on other workspace crates; its
//! "N crates" says how many there are; each "modules of `crate`" line lists exactly the
//! modules the crate's `src/lib.rs` declares.
//!
//! The facts come from `cargo metadata` (Cargo's own reading of the manifests) and from the
//! `mod` items of each `lib.rs`, not from the document.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A workspace crate as Cargo sees it.
#[derive(Debug)]
struct Crate {
    /// Its directory relative to the workspace root, with a trailing `/`.
    path: String,
    /// Its normal dependencies that are workspace crates.
    deps: BTreeSet<String>,
    /// Its library's root file, if it has a library.
    lib: Option<PathBuf>,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn workspace() -> BTreeMap<String, Crate> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(root())
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let packages = meta["packages"].as_array().unwrap();
    let names: BTreeSet<String> = packages
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect();
    let root = root();
    packages
        .iter()
        .map(|p| {
            let manifest = Path::new(p["manifest_path"].as_str().unwrap());
            let dir = manifest.parent().unwrap().strip_prefix(&root).unwrap();
            let deps = p["dependencies"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| d["kind"].is_null())
                .map(|d| d["name"].as_str().unwrap().to_owned())
                .filter(|n| names.contains(n))
                .collect();
            let lib = p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["kind"].as_array().unwrap().iter().any(|k| k == "lib"))
                .map(|t| PathBuf::from(t["src_path"].as_str().unwrap()));
            let krate = Crate {
                path: format!("{}/", dir.display()),
                deps,
                lib,
            };
            (p["name"].as_str().unwrap().to_owned(), krate)
        })
        .collect()
}

/// The names in backticks in `text`.
fn quoted(text: &str) -> Vec<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// The modules a `lib.rs` declares (`mod x;`, `pub mod x;` or `pub(crate) mod x;`, whatever
/// attributes precede).
fn declared_modules(lib: &Path) -> BTreeSet<String> {
    std::fs::read_to_string(lib)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let l = ["pub ", "pub(crate) "]
                .iter()
                .find_map(|p| l.strip_prefix(p))
                .unwrap_or(l);
            l.strip_prefix("mod ")?
                .strip_suffix(';')
                .map(|m| m.trim().to_owned())
        })
        .collect()
}

const NUMBERS: [&str; 13] = [
    "Zero", "One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine", "Ten",
    "Eleven", "Twelve",
];

#[test]
fn architecture_doc_matches_cargo_and_lib_rs() {
    let crates = workspace();
    let doc = std::fs::read_to_string(root().join("docs/architecture.md")).unwrap();

    // "N crates (Cargo workspace)".
    let count_line = doc
        .lines()
        .find(|l| l.contains(" crates (Cargo workspace)"))
        .expect("docs/architecture.md: no \"N crates (Cargo workspace)\" line");
    let word = count_line.split_whitespace().next().unwrap();
    let said = NUMBERS.iter().position(|n| *n == word);
    assert_eq!(
        said,
        Some(crates.len()),
        "docs/architecture.md says \"{word} crates\"; the workspace has {}",
        crates.len()
    );

    // The table: `name` | `path/` | what | depends on.
    let mut rows = BTreeMap::new();
    let table = doc
        .lines()
        .skip_while(|l| !l.starts_with("| crate | path |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'));
    for line in table {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let name = quoted(cells[1]).remove(0);
        let path = quoted(cells[2]).remove(0);
        let deps: BTreeSet<String> = quoted(cells[4])
            .into_iter()
            .filter(|n| crates.contains_key(n))
            .collect();
        assert!(
            rows.insert(name.clone(), (path, deps)).is_none(),
            "docs/architecture.md: two rows for {name}"
        );
    }
    let documented: BTreeSet<&String> = rows.keys().collect();
    let real: BTreeSet<&String> = crates.keys().collect();
    assert_eq!(
        documented, real,
        "the crate table's rows against the workspace"
    );
    for (name, (path, deps)) in &rows {
        let c = &crates[name];
        assert_eq!(path, &c.path, "{name}: its path in the crate table");
        assert_eq!(
            deps, &c.deps,
            "{name}: its workspace dependencies in the crate table"
        );
    }

    // "- modules of `crate`: `a`, `b`, ..." for every published library but the mock.
    let mut listed = BTreeSet::new();
    for line in doc.lines().filter(|l| l.starts_with("- modules of `")) {
        let (head, list) = line.split_once(':').unwrap();
        let name = quoted(head).remove(0);
        let lib = crates[&name]
            .lib
            .as_ref()
            .unwrap_or_else(|| panic!("{name} has no library"));
        let documented: BTreeSet<String> = quoted(list).into_iter().collect();
        assert_eq!(
            documented,
            declared_modules(lib),
            "the modules of {name} against {}",
            lib.display()
        );
        listed.insert(name);
    }
    for name in ["vfio-mig", "vfio-mig-session", "vfio-mig-fence"] {
        assert!(
            listed.contains(name),
            "docs/architecture.md lists no modules of {name}"
        );
    }
}
