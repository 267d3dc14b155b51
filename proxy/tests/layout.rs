//! The library's modules depend on each other one way: no cycle between the top-level modules,
//! none between the files of one folder, and the model imports nothing of the agent. Read from
//! the sources' `crate::` and `super::` paths (test modules aside).
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

/// The first segment of every path that starts with `prefix` (`crate::`, `super::`) in `src`,
/// `use prefix{a, b::c}` groups included.
fn refs(src: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = src;
    while let Some(i) = rest.find(prefix) {
        rest = &rest[i + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // The group's top-level names.
            let (mut depth, mut name, mut end) = (1, String::new(), group.len());
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    _ => {}
                }
                if depth == 0 || (depth == 1 && c == ',') {
                    out.insert(first_segment(&name));
                    name.clear();
                    if depth == 0 {
                        end = j;
                        break;
                    }
                } else if depth == 1 || !name.contains("::") {
                    name.push(c);
                }
            }
            rest = &group[end..];
        } else {
            out.insert(first_segment(rest));
        }
    }
    out.remove("");
    out
}

fn first_segment(s: &str) -> String {
    s.trim()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

/// A source file's text without its test module.
fn code(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap();
    match text.find("#[cfg(test)]") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

fn rs_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(rs_files(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out
}

/// A cycle of `graph`, if it has one.
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        g: &BTreeMap<String, BTreeSet<String>>,
        node: &str,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|n| n == node) {
            let mut c = path[i..].to_vec();
            c.push(node.to_string());
            return Some(c);
        }
        path.push(node.to_string());
        for next in g.get(node).into_iter().flatten() {
            if let Some(c) = visit(g, next, path) {
                return Some(c);
            }
        }
        path.pop();
        None
    }
    graph.keys().find_map(|n| visit(graph, n, &mut Vec::new()))
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The library's top-level modules, and which of them each one's files name.
fn top_level() -> BTreeMap<String, BTreeSet<String>> {
    let src = src();
    let lib = code(&src.join("lib.rs"));
    let mods: BTreeSet<String> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod "))
        .map(|m| m.trim_end_matches(';').to_string())
        .collect();
    let mut g = BTreeMap::new();
    for m in &mods {
        let (dir, file) = (src.join(m), src.join(format!("{m}.rs")));
        let files = if dir.is_dir() {
            rs_files(&dir)
        } else {
            vec![file]
        };
        let used: BTreeSet<String> = files
            .iter()
            .flat_map(|f| refs(&code(f), "crate::"))
            .filter(|r| r != m && mods.contains(r))
            .collect();
        g.insert(m.clone(), used);
    }
    g
}

#[test]
fn the_top_level_modules_depend_on_each_other_one_way() {
    let g = top_level();
    assert!(g.len() >= 8, "{g:?}");
    assert_eq!(cycle(&g), None, "{g:#?}");
    let model = &g["model"];
    assert!(
        model.iter().all(|m| m == "error"),
        "the model imports {model:?}"
    );
}

#[test]
fn the_files_of_each_folder_depend_on_each_other_one_way() {
    let mut dirs = vec![src()];
    while let Some(dir) = dirs.pop() {
        // Nodes: the folder's files and its subfolders (whose `mod.rs` names their siblings).
        let mut nodes: BTreeMap<String, PathBuf> = BTreeMap::new();
        for e in fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            let name = p.file_stem().unwrap().to_string_lossy().to_string();
            if p.is_dir() {
                dirs.push(p.clone());
                if p.join("mod.rs").exists() {
                    nodes.insert(name, p.join("mod.rs"));
                }
            } else if p.extension().is_some_and(|x| x == "rs")
                && !["mod", "lib", "main"].contains(&name.as_str())
            {
                nodes.insert(name, p);
            }
        }
        let g: BTreeMap<String, BTreeSet<String>> = nodes
            .iter()
            .map(|(me, f)| {
                let used = refs(&code(f), "super::")
                    .into_iter()
                    .filter(|r| r != me && nodes.contains_key(r))
                    .collect();
                (me.clone(), used)
            })
            .collect();
        assert_eq!(cycle(&g), None, "{}: {g:#?}", dir.display());
    }
}

#[test]
fn the_reader_finds_paths_in_groups_and_alone() {
    let src = "use crate::{\n    admin::{a, b},\n    datapath::{x::y, z},\n    model,\n};\nfn f() { crate::k8s::file::read(); super::pins::unpin(); }";
    assert_eq!(
        refs(src, "crate::").into_iter().collect::<Vec<_>>(),
        ["admin", "datapath", "k8s", "model"]
    );
    assert_eq!(
        refs(src, "super::").into_iter().collect::<Vec<_>>(),
        ["pins"]
    );
    let g = BTreeMap::from([
        ("a".to_string(), BTreeSet::from(["b".to_string()])),
        ("b".to_string(), BTreeSet::from(["a".to_string()])),
    ]);
    assert!(cycle(&g).is_some());
}
