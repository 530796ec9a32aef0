//! The module dependency rules of ARCHITECTURE.md, checked on the sources: each module of the
//! aggregator imports only modules listed before it in [`ORDER`], so there are no cycles.

use std::{collections::BTreeSet, path::Path};

/// Leaves first; a module may import only modules before it (ARCHITECTURE.md says why).
const ORDER: &[&str] = &[
    "clock",
    "defaults",
    "otlp_wire",
    "hcl",
    "connection_key",
    "actors",
    "observation",
    "placement",
    "stitch",
    "store",
    "checkpoints",
    "flow_table",
    "metadata",
    "span",
    "metrics",
    "tls",
    "replication",
    "observe",
    "export",
    "ingest",
    "shard",
    "admin",
    "pipeline",
    "cluster",
    "config",
    "settings",
];

/// The crate modules that `text` (one source file, without its tests and comments) names.
fn imported(text: &str) -> BTreeSet<String> {
    let code: String = text
        .split("#[cfg(test)]\nmod tests")
        .next()
        .unwrap_or_default()
        .lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut names = BTreeSet::new();
    // `crate::name` anywhere, and the first segment of each item of `use crate::{...}`.
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find("};").unwrap_or(group.len())];
            let mut depth = 0;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        names.insert(first_segment(&item));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
            names.insert(first_segment(&item));
        } else {
            names.insert(first_segment(rest));
        }
    }
    names.remove("");
    names
}

fn first_segment(path: &str) -> String {
    path.trim()
        .chars()
        .take_while(|c| c.is_ascii_lowercase() || *c == '_')
        .collect()
}

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_module_imports_only_modules_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut violations = Vec::new();
    let mut seen = BTreeSet::new();
    for file in files {
        let relative = file.strip_prefix(&src).unwrap();
        let module = first_segment(&relative.to_string_lossy());
        let Some(rank) = ORDER.iter().position(|m| *m == module) else {
            assert!(
                ["main", "lib", "test_records"].contains(&module.as_str()),
                "{} is not in ORDER: place it in the dependency rules",
                relative.display()
            );
            continue;
        };
        seen.insert(module.clone());
        for name in imported(&std::fs::read_to_string(&file).unwrap()) {
            if let Some(other) = ORDER.iter().position(|m| *m == name)
                && other >= rank
                && name != module
            {
                violations.push(format!("{} imports {name}", relative.display()));
            }
        }
    }
    assert_eq!(violations, Vec::<String>::new());
    assert_eq!(seen.len(), ORDER.len(), "every listed module exists");
}

#[test]
fn the_import_reader_sees_grouped_and_plain_paths() {
    let text = "use crate::{\n    store::{Store, StoreError},\n    flow_table::Emitted,\n};\nfn f() { crate::clock::unix_now(); }\n// crate::settings in a comment\n";
    let names: Vec<String> = imported(text).into_iter().collect();
    assert_eq!(names, ["clock", "flow_table", "store"]);
}
