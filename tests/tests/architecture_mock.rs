//! ARCHITECTURE.md is true, and this keeps it so (as rust-analyzer's `tidy` does): every source
//! file of the six crates is on its map and every file the map names exists; and the rules it
//! states hold in the code: the hotplug crate's folders import only what their row of the table
//! allows, `device_del` is sent only by `qemu/unplug.rs`, QEMU's error strings are matched only in
//! `qemu/errors.rs`, QEMU object names are spelled only in `cmdline::names`, and no module but
//! `vm.rs` and `lib.rs` names `Vm`.

use std::path::{Path, PathBuf};

fn top() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The crates the map covers, by folder.
const CRATES: [&str; 6] = ["qmp", "qga", "mock", "netdev", "cmdline", "hotplug"];

/// Every `.rs` file under `dir`, as paths relative to it.
fn sources(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path
                    .strip_prefix(dir)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                out.push(rel);
            }
        }
    }
    out.sort();
    out
}

/// A file's code without comments, doc comments and its `#[cfg(test)]` module (tests spell the
/// names they expect).
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => &text,
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The section of ARCHITECTURE.md about crate folder `dir`.
fn section<'a>(doc: &'a str, dir: &str) -> &'a str {
    let head = format!("### `{dir}/`");
    let start = doc
        .find(&head)
        .unwrap_or_else(|| panic!("ARCHITECTURE.md has no section {head}"));
    let rest = &doc[start + head.len()..];
    let end = rest
        .find("\n### ")
        .or_else(|| rest.find("\n## "))
        .unwrap_or(rest.len());
    &rest[..end]
}

#[test]
fn every_source_file_is_on_the_map_and_the_map_names_no_missing_file() {
    let doc = std::fs::read_to_string(top().join("ARCHITECTURE.md")).unwrap();
    let mut missing = Vec::new();
    let mut stale = Vec::new();
    for dir in CRATES {
        let src = top().join(dir).join("src");
        let section = section(&doc, dir);
        let files = sources(&src);
        for file in &files {
            let name = Path::new(file).file_name().unwrap().to_string_lossy();
            // A folder's `mod.rs` is named with its folder (`kinds/`, `command/`).
            let folder = Path::new(file)
                .parent()
                .map(|p| format!("`{}/`", p.to_string_lossy()));
            let named = section.contains(&format!("`{name}`"))
                || section.contains(&format!("`{file}`"))
                || (name == "mod.rs" && folder.is_some_and(|f| section.contains(&f)));
            if !named && name != "lib.rs" {
                missing.push(format!("{dir}/src/{file}"));
            }
        }
        // Each `x.rs` the section names is a file of the crate.
        for token in section.split('`').skip(1).step_by(2) {
            let Some(file) = token.strip_suffix(".rs") else {
                continue;
            };
            if file.contains(' ') || file.contains('<') {
                continue;
            }
            let in_crate = files.iter().any(|f| {
                f.strip_suffix(".rs")
                    .is_some_and(|f| f == file || f.ends_with(&format!("/{file}")))
            });
            // A path from the top of the repository names a file there.
            let in_repo = token.contains('/') && top().join(token).exists();
            if !in_crate && !in_repo {
                stale.push(format!("{dir}: {token}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "not on ARCHITECTURE.md's map: {missing:?}"
    );
    assert!(
        stale.is_empty(),
        "ARCHITECTURE.md names files that are gone: {stale:?}"
    );
}

/// `(file, line)` of each line of the crates' code (outside the allowed files) that matches.
fn offenders(allowed: &[&str], matches: impl Fn(&str) -> bool) -> Vec<String> {
    let mut out = Vec::new();
    for dir in CRATES {
        let src = top().join(dir).join("src");
        for file in sources(&src) {
            let path = format!("{dir}/src/{file}");
            if allowed.iter().any(|a| path.ends_with(a)) {
                continue;
            }
            for (n, line) in code(&src.join(&file)).lines().enumerate() {
                if matches(line) {
                    out.push(format!("{path}:{}: {}", n + 1, line.trim()));
                }
            }
        }
    }
    out
}

#[test]
fn device_del_is_sent_only_by_the_unplug_module() {
    // The qmp crate defines the command; the mock plays QEMU.
    let allowed = [
        "hotplug/src/qemu/unplug.rs",
        "qmp/src/command/device.rs",
        "mock/src/model.rs",
        "mock/src/qemu.rs",
    ];
    // Sent typed, or raw; a kind's list of the commands it needs names it only for the schema.
    let found = offenders(&allowed, |l| {
        l.contains("DeviceDel {") || l.contains("execute_raw(\"device_del\"")
    });
    assert!(found.is_empty(), "device_del outside unplug.rs: {found:#?}");
}

#[test]
fn qemu_error_strings_are_matched_only_in_qemu_errors() {
    let allowed = [
        "hotplug/src/qemu/errors.rs",
        "qmp/src/error.rs",
        "mock/src/model.rs",
        "mock/src/qemu.rs",
    ];
    let found = offenders(&allowed, |l| {
        l.contains("qmp_desc()") || l.contains("qmp_class()")
    });
    assert!(
        found.is_empty(),
        "QEMU error strings matched outside qemu/errors.rs: {found:#?}"
    );
}

#[test]
fn qemu_object_names_are_spelled_only_in_cmdline_names() {
    let allowed = [
        "cmdline/src/names.rs",
        "mock/src/model.rs",
        "mock/src/qemu.rs",
    ];
    let spelled = |l: &str| {
        l.contains("\"/machine/peripheral")
            || l.contains("qhotplug:")
            || [
                "-fmt", "-file", "-net", "-chr", "-mem", "-rng", "-tap", "-vhost",
            ]
            .iter()
            .any(|suffix| {
                l.contains(&format!("}}{suffix}")) || l.contains(&format!("\"{suffix}\""))
            })
            || l.contains("}.0\"")
            || l.contains("\"migrate-out\"")
            || l.contains("\"migrate-in\"")
            // Job ids, storage migration's nodes and TLS object, bitmaps, the master key.
            || [
                "mirror-", "commit-", "stream-", "backup-", "pull-", "create-", "mig-", "qhotplug-",
            ]
            .iter()
            .any(|prefix| l.contains(&format!("\"{prefix}")))
            || formats_a_name(l)
    };
    let found = offenders(&allowed, spelled);
    assert!(
        found.is_empty(),
        "QEMU object names outside cmdline::names: {found:#?}"
    );
}

/// Whether `line` formats a name from a prefix: a string literal that starts with words joined
/// by `-` and goes on with `-{` (`"backup-{disk}"`, `"qhotplug-size-{}"`).
fn formats_a_name(line: &str) -> bool {
    line.split('"').skip(1).step_by(2).any(|literal| {
        let Some(at) = literal.find("-{") else {
            return false;
        };
        let head = &literal[..at];
        !head.is_empty()
            && head.starts_with(|c: char| c.is_ascii_lowercase())
            && head
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
    })
}

#[test]
fn query_block_is_sent_only_by_the_block_view() {
    // The qmp crate defines the command; the mock plays QEMU; the harness checks QEMU's state.
    let allowed = [
        "hotplug/src/qemu/block.rs",
        "qmp/src/command/block.rs",
        "mock/src/model.rs",
        "mock/src/qemu.rs",
    ];
    // `QueryBlock` itself, not a longer name (`QueryBlockExports`).
    let found = offenders(&allowed, |l| {
        l.match_indices("QueryBlock").any(|(at, word)| {
            !l[at + word.len()..].starts_with(|c: char| c.is_alphanumeric() || c == '_')
        })
    });
    assert!(
        found.is_empty(),
        "query-block outside qemu/block.rs: {found:#?}"
    );
}

#[test]
fn only_the_handle_names_vm() {
    let allowed = ["hotplug/src/vm.rs", "hotplug/src/lib.rs"];
    let found = offenders(&allowed, |l| {
        l.contains("crate::vm::Vm") || l.contains("crate::Vm") || l.contains("use crate::vm::{")
    });
    assert!(found.is_empty(), "modules naming Vm: {found:#?}");
}

/// The top-level module a source file belongs to (`kinds/disk.rs` → `kinds`), `None` for the
/// crate root.
fn module_of(file: &str) -> Option<String> {
    let first = file.split('/').next().unwrap();
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib").then(|| name.to_owned())
}

/// The crate's top-level modules that `code` names through `crate::`.
fn imports(code: &str, modules: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        let names: Vec<&str> = match rest.strip_prefix('{') {
            // `use crate::{a, b::c}`: the first segment of each path in the braces.
            Some(group) => {
                let group = &group[..group.find('}').unwrap_or(group.len())];
                group.split(',').map(|p| p.trim()).collect()
            }
            None => vec![rest],
        };
        for path in names {
            let name: String = path
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if modules.contains(&name) && !out.contains(&name) {
                out.push(name);
            }
        }
    }
    out
}

#[test]
fn no_module_imports_another_that_imports_it_back() {
    let mut cycles = Vec::new();
    for dir in CRATES {
        let src = top().join(dir).join("src");
        let files = sources(&src);
        let mut modules: Vec<String> = files.iter().filter_map(|f| module_of(f)).collect();
        modules.dedup();
        // Module → the modules it imports.
        let mut graph: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for file in &files {
            let Some(module) = module_of(file) else {
                continue;
            };
            let found = imports(&code(&src.join(file)), &modules);
            let edges = graph.entry(module.clone()).or_default();
            for m in found {
                if m != module && !edges.contains(&m) {
                    edges.push(m);
                }
            }
        }
        // A cycle is a module that can reach itself.
        for start in graph.keys() {
            let mut stack = vec![(start.clone(), vec![start.clone()])];
            let mut seen = std::collections::BTreeSet::new();
            while let Some((at, path)) = stack.pop() {
                for next in graph.get(&at).into_iter().flatten() {
                    if next == start {
                        cycles.push(format!("{dir}: {} → {start}", path.join(" → ")));
                    } else if seen.insert(next.clone()) {
                        let mut longer = path.clone();
                        longer.push(next.clone());
                        stack.push((next.clone(), longer));
                    }
                }
            }
        }
    }
    assert!(cycles.is_empty(), "import cycles: {cycles:#?}");
}

#[test]
fn span_names_come_from_the_one_list() {
    // Every span the crates open is named by a constant of `qhotplug::spans` (or the qmp crate's
    // `QMP_SPAN`), never by a literal.
    let found = offenders(&[], |l| l.contains("_span!(\""));
    assert!(found.is_empty(), "span names spelled in place: {found:#?}");
}

/// The hotplug crate's folder table in ARCHITECTURE.md: each folder and the modules it may import.
fn folder_rules(doc: &str) -> Vec<(String, Vec<String>)> {
    let section = section(doc, "hotplug");
    let mut rules = Vec::new();
    for line in section.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // `| `storage/` | what | `engine`, `qemu` |`: five cells with the empty ends.
        let [_, folder, _, allowed, _] = cells[..] else {
            continue;
        };
        let Some(folder) = folder.strip_prefix('`').and_then(|f| f.strip_suffix("/`")) else {
            continue;
        };
        let allowed = allowed
            .split(',')
            .map(|m| m.trim().trim_matches('`').to_owned())
            .filter(|m| !m.is_empty())
            .collect();
        rules.push((folder.to_owned(), allowed));
    }
    rules
}

#[test]
fn each_folder_imports_only_what_its_row_allows() {
    let doc = std::fs::read_to_string(top().join("ARCHITECTURE.md")).unwrap();
    let rules = folder_rules(&doc);
    let src = top().join("hotplug/src");
    let files = sources(&src);
    let mut modules: Vec<String> = files.iter().filter_map(|f| module_of(f)).collect();
    modules.dedup();
    let folders: Vec<&String> = modules
        .iter()
        .filter(|m| src.join(m.as_str()).is_dir())
        .collect();
    // Every folder has a row, and every row a folder.
    for folder in &folders {
        assert!(
            rules.iter().any(|(f, _)| f == *folder),
            "hotplug/src/{folder}/ has no row in ARCHITECTURE.md's folder table"
        );
    }
    assert!(
        rules.len() >= 5,
        "the folder table was not found: {rules:?}"
    );
    let mut broken = Vec::new();
    for (folder, allowed) in &rules {
        assert!(
            folders.contains(&folder),
            "ARCHITECTURE.md's folder table names {folder}/, which is not a folder"
        );
        for file in files
            .iter()
            .filter(|f| f.starts_with(&format!("{folder}/")))
        {
            for module in imports(&code(&src.join(file)), &modules) {
                if module != *folder && !allowed.contains(&module) {
                    broken.push(format!("hotplug/src/{file} imports crate::{module}"));
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "imports the folder table does not allow: {broken:#?}"
    );
}

#[test]
fn every_test_file_is_named_by_its_tier() {
    // `_mock`: nothing but the build; `_qemu`: a real QEMU and root; `_guest`: a booted guest.
    // `scripts/test-fast` and `.config/nextest.toml` select by these names.
    let mut unnamed = Vec::new();
    for dir in [
        "tests/tests",
        "hotplug/tests",
        "qga/tests",
        "examples/tests",
    ] {
        for file in sources(&top().join(dir)) {
            let stem = file.strip_suffix(".rs").unwrap();
            if !["_mock", "_qemu", "_guest"]
                .iter()
                .any(|t| stem.ends_with(t))
            {
                unnamed.push(format!("{dir}/{file}"));
            }
        }
    }
    assert!(
        unnamed.is_empty(),
        "test files not named by their tier: {unnamed:?}"
    );
}
