//! The documentation is the code's: man pages regenerate to what is committed,
//! shell completions are valid scripts, and every command the README shows in a
//! ```sh block parses with the real binaries' clap definitions.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use mesh_tests::binary;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn man_pages_are_up_to_date() {
    let dir = tempfile::tempdir().unwrap();
    for (bin, page) in [
        ("meshd", "meshd.8"),
        ("meshctl", "meshctl.1"),
        ("locksmith", "locksmith.1"),
    ] {
        let out = Command::new(binary(bin))
            .arg("generate-man")
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let fresh = std::fs::read_to_string(dir.path().join(page)).unwrap();
        let committed = std::fs::read_to_string(repo().join("man").join(page)).unwrap_or_default();
        assert!(
            fresh == committed,
            "man/{page} is out of date: run scripts/gen-man and commit man/"
        );
        assert!(fresh.contains(&format!(".TH {bin} ")), "{fresh}");
    }
}

#[test]
fn completions_for_bash_zsh_fish_are_valid_scripts() {
    for (shell, marker) in [
        ("bash", "_meshctl()"),
        ("zsh", "#compdef meshctl"),
        ("fish", "complete -c meshctl"),
    ] {
        let out = Command::new(binary("meshctl"))
            .args(["completion", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8(out.stdout).unwrap();
        assert!(script.contains(marker), "{shell}: no {marker:?}");
        // Subcommands and their flags are completed.
        for word in ["snapshot", "endpoint", "prefix"] {
            assert!(script.contains(word), "{shell}: no {word}");
        }
        // Syntax check by the shell itself (scripts/test installs zsh and fish).
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("completion");
        std::fs::write(&f, &script).unwrap();
        let check = Command::new(shell)
            .arg("-n")
            .arg(&f)
            .output()
            .unwrap_or_else(|e| panic!("{shell} is needed to check its completion: {e}"));
        assert!(
            check.status.success(),
            "{shell} -n: {}",
            String::from_utf8_lossy(&check.stderr)
        );
    }
}

/// The command lines of the README's ```sh blocks, `\`-continuations joined.
fn sh_blocks(readme: &str) -> Vec<Vec<String>> {
    let mut blocks = Vec::new();
    let mut current: Option<Vec<String>> = None;
    for line in readme.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```sh") => current = Some(Vec::new()),
            (Some(_), "```") => blocks.push(current.take().unwrap()),
            (Some(lines), l) => match lines.last_mut() {
                Some(prev) if prev.ends_with('\\') => {
                    prev.pop();
                    prev.push_str(l);
                }
                _ => lines.push(l.to_string()),
            },
            (None, _) => {}
        }
    }
    blocks
}

/// Splits a command line the way sh would for these simple lines: quotes, `$VAR`
/// from earlier assignments, comments, and `|`/`&&`/`;`/`&` between commands
/// (redirections dropped). Returns the words of each command.
fn commands(line: &str, vars: &HashMap<String, String>) -> Vec<Vec<String>> {
    let mut cmds = vec![Vec::new()];
    let mut word: Option<String> = None;
    let mut chars = line.chars().peekable();
    let mut skip_next = false;
    let end_word = |word: &mut Option<String>, cmds: &mut Vec<Vec<String>>, skip: &mut bool| {
        if let Some(w) = word.take() {
            if std::mem::take(skip) {
                return;
            }
            cmds.last_mut().unwrap().push(w);
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '#' if word.is_none() => break,
            ' ' | '\t' => end_word(&mut word, &mut cmds, &mut skip_next),
            '|' | ';' | '&' => {
                end_word(&mut word, &mut cmds, &mut skip_next);
                while chars.peek().is_some_and(|n| matches!(n, '|' | '&')) {
                    chars.next();
                }
                cmds.push(Vec::new());
            }
            '>' | '<' => {
                end_word(&mut word, &mut cmds, &mut skip_next);
                skip_next = true;
            }
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                for q in chars.by_ref() {
                    if q == '\'' {
                        break;
                    }
                    w.push(q);
                }
            }
            '"' => {
                let mut quoted = String::new();
                for q in chars.by_ref() {
                    if q == '"' {
                        break;
                    }
                    quoted.push(q);
                }
                word.get_or_insert_with(String::new)
                    .push_str(&expand(&quoted, vars));
            }
            '$' => {
                let mut name = String::new();
                while let Some(n) = chars.peek().filter(|n| n.is_alphanumeric() || **n == '_') {
                    name.push(*n);
                    chars.next();
                }
                let value = vars
                    .get(&name)
                    .cloned()
                    .unwrap_or_else(|| format!("${name}"));
                word.get_or_insert_with(String::new).push_str(&value);
            }
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    end_word(&mut word, &mut cmds, &mut skip_next);
    cmds.retain(|c| !c.is_empty());
    cmds
}

fn expand(s: &str, vars: &HashMap<String, String>) -> String {
    let mut out = s.to_string();
    for (k, v) in vars {
        out = out.replace(&format!("${k}"), v);
    }
    out
}

/// `(tool, args)` when the command runs meshd, meshctl or locksmith (directly, by
/// path, under `sudo [-u USER]`, or after `VAR=value` assignments).
fn invocation(words: &[String]) -> Option<(String, Vec<String>)> {
    let mut i = 0;
    while i < words.len() {
        let w = &words[i];
        if w == "sudo" || w == "export" {
            i += 1;
        } else if w == "-u" {
            i += 2;
        } else if w.contains('=') && !w.starts_with('-') {
            i += 1;
        } else {
            break;
        }
    }
    let tool = words.get(i)?.rsplit('/').next()?.to_string();
    ["meshd", "meshctl", "locksmith"]
        .contains(&tool.as_str())
        .then(|| (tool, words[i + 1..].to_vec()))
}

#[test]
fn every_readme_command_parses_with_the_real_binaries() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let mut checked = 0;
    let mut failures = Vec::new();
    for block in sh_blocks(&readme) {
        let mut vars = HashMap::new();
        for line in block {
            for words in commands(&line, &vars) {
                // `NAME=value` alone (or exported) sets a variable for later lines.
                let assigns = words.iter().all(|w| w == "export" || w.contains('='))
                    && !words.iter().any(|w| w.starts_with('-'));
                if assigns {
                    for w in &words {
                        if let Some((k, v)) = w.split_once('=') {
                            vars.insert(k.to_string(), v.to_string());
                        }
                    }
                    continue;
                }
                let Some((tool, args)) = invocation(&words) else {
                    continue;
                };
                let out = Command::new(binary(&tool))
                    .arg("check-args")
                    .args(&args)
                    .output()
                    .unwrap();
                checked += 1;
                if !out.status.success() {
                    failures.push(format!(
                        "{line}\n  {tool} {args:?}: {}",
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "README commands that do not parse:\n{}",
        failures.join("\n")
    );
    // Guards against the extraction silently finding nothing.
    assert!(checked >= 25, "only {checked} README commands found");
}

#[test]
fn readme_configuration_table_lists_every_key() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let out = Command::new(binary("meshd"))
        .args(["config", "default"])
        .output()
        .unwrap();
    let default = String::from_utf8(out.stdout).unwrap();
    let keys: Vec<&str> = default
        .lines()
        .filter_map(|l| l.trim_start_matches("# ").split_once(':'))
        .map(|(k, _)| k)
        .filter(|k| !k.contains(' ') && !k.is_empty())
        .collect();
    assert!(keys.len() > 20, "{keys:?}");
    for key in keys {
        assert!(
            readme.contains(&format!("| `--{key}` |")),
            "README's configuration table lacks --{key}"
        );
    }
}

#[test]
fn command_extraction_understands_quotes_vars_and_sudo() {
    let mut vars = HashMap::new();
    vars.insert("C".to_string(), "a=h:1".to_string());
    let cmds = commands(
        r#"sudo -u meshd meshctl put k "a b" --x=$C & echo 'q' > /dev/null # c"#,
        &vars,
    );
    assert_eq!(cmds.len(), 2, "{cmds:?}");
    let (tool, args) = invocation(&cmds[0]).unwrap();
    assert_eq!(tool, "meshctl");
    assert_eq!(args, ["put", "k", "a b", "--x=a=h:1"]);
    assert_eq!(cmds[1], ["echo", "q"]);
    assert!(invocation(&[
        "sudo".into(),
        "install".into(),
        "target/release/meshd".into()
    ])
    .is_none());
}

/// `expected` is part of `actual`: every field shown has the value shown (recursively;
/// arrays element by element, with the same length).
fn json_contains(actual: &serde_json::Value, expected: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (actual, expected) {
        (Value::Object(a), Value::Object(e)) => e
            .iter()
            .all(|(k, ev)| a.get(k).is_some_and(|av| json_contains(av, ev))),
        (Value::Array(a), Value::Array(e)) => {
            a.len() == e.len() && a.iter().zip(e).all(|(av, ev)| json_contains(av, ev))
        }
        _ => actual == expected,
    }
}

/// The README's curl examples, run in order against a fresh member on a free port;
/// a `# ...` line under a command is the answer it must give (JSON: the fields shown;
/// otherwise the text). Streaming examples (`--max-time`) are judged by their first
/// line and may end by timing out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_curl_examples_answer_as_shown() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let c = mesh_tests::InProcessCluster::start(1, mesh_tests::ClusterOpts::default()).await;
    let addr = c.addr(0);
    mesh_tests::wait_for_leader(&[addr]).await;
    let mut examples: Vec<(String, Option<String>)> = Vec::new();
    for block in sh_blocks(&readme) {
        for line in block {
            if line.starts_with("curl ") {
                examples.push((line, None));
            } else if let (Some(expect), Some(last)) =
                (line.strip_prefix("# "), examples.last_mut())
            {
                if last.1.is_none() {
                    last.1 = Some(expect.to_string());
                }
            }
        }
    }
    let api: Vec<_> = examples
        .iter()
        .filter(|(l, _)| l.contains("/v3/"))
        .collect();
    assert!(
        api.len() >= 5,
        "the README shows the JSON gateway with curl"
    );
    let mut failures = Vec::new();
    for (line, expect) in &examples {
        if line.contains("127.0.0.1:2381") || !line.contains("127.0.0.1:2379") {
            continue;
        }
        let cmd = line.replace("127.0.0.1:2379", &addr.to_string());
        let out = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(&cmd)
            .output()
            .await
            .unwrap();
        let streaming = cmd.contains("--max-time");
        let code = out.status.code();
        if !(code == Some(0) || (streaming && code == Some(28))) {
            failures.push(format!("{line}: exit {code:?}"));
            continue;
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let Some(expect) = expect else { continue };
        let got = if streaming {
            text.lines().next().unwrap_or("").to_string()
        } else {
            text.trim().to_string()
        };
        let ok = match serde_json::from_str::<serde_json::Value>(expect) {
            Ok(e) => serde_json::from_str(&got).is_ok_and(|g| json_contains(&g, &e)),
            Err(_) => got == *expect,
        };
        if !ok {
            failures.push(format!("{line}\n  expected: {expect}\n  got:      {got}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// docs/ARCHITECTURE.md stays true about where things are: every path it names in
/// backticks exists.
#[test]
fn architecture_doc_names_only_existing_paths() {
    let doc = std::fs::read_to_string(repo().join("docs/ARCHITECTURE.md")).unwrap();
    let mut named = 0;
    let mut missing = Vec::new();
    for (i, part) in doc.split('`').enumerate() {
        // Odd parts are inside backticks.
        let looks_like_path = i % 2 == 1
            && part.contains('/')
            && !part.contains(' ')
            && !part.starts_with('/')
            && !part.contains("://");
        if !looks_like_path {
            continue;
        }
        named += 1;
        if !repo().join(part).exists() {
            missing.push(part.to_string());
        }
    }
    assert!(named > 20, "the map names the files it describes");
    assert!(
        missing.is_empty(),
        "docs/ARCHITECTURE.md names missing paths: {missing:?}"
    );
}
