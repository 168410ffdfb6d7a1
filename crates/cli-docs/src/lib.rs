//! Commands for the repository's scripts and tests that every binary answers before
//! its own parsing. They are not clap commands, so they stay out of the CLI, its
//! help, man page and completions:
//!
//! - `BIN generate-man DIR` writes the man page rendered from the clap definitions
//!   (`scripts/gen-man`; `tests/tests/docs.rs` compares the result with `man/`);
//! - `BIN check-args ARGS...` only parses ARGS as `BIN ARGS...` would: exit 0, or the
//!   usage error and exit 2 (the README test checks every documented command so).

use std::ffi::OsString;
use std::path::Path;
use std::process::ExitCode;

use clap::Parser;

/// Runs a hidden command if the process was started with one (`None` otherwise).
/// `section` is the man section (`"1"`, `"8"`); the page is `<bin>.<section>`.
pub fn hidden_command<C: Parser>(bin: &str, section: &str) -> Option<ExitCode> {
    run(
        bin,
        section,
        C::command(),
        std::env::args_os().skip(1).collect(),
    )
}

/// [`hidden_command`] for a command built at run time (e.g. with arguments added to
/// the derived ones).
pub fn hidden_command_of(bin: &str, section: &str, cmd: clap::Command) -> Option<ExitCode> {
    run(bin, section, cmd, std::env::args_os().skip(1).collect())
}

fn run(bin: &str, section: &str, cmd: clap::Command, args: Vec<OsString>) -> Option<ExitCode> {
    let mut args = args.into_iter();
    let first = args.next()?;
    if first == "check-args" {
        let argv = std::iter::once(OsString::from(bin)).chain(args);
        return Some(match cmd.try_get_matches_from(argv) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) if !e.use_stderr() => ExitCode::SUCCESS, // --help, --version
            Err(e) => {
                eprint!("{e}");
                ExitCode::from(2)
            }
        });
    }
    if first != "generate-man" {
        return None;
    }
    let Some(dir) = args.next() else {
        eprintln!("usage: {bin} generate-man DIR");
        return Some(ExitCode::from(2));
    };
    let path = Path::new(&dir).join(format!("{bin}.{section}"));
    let mut page = Vec::new();
    let written = clap_mangen::Man::new(cmd)
        .section(section)
        .render(&mut page)
        .and_then(|()| std::fs::write(&path, page));
    Some(match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{bin}: cannot write {}: {e}", path.display());
            ExitCode::FAILURE
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[derive(Parser)]
    #[command(name = "demo", version)]
    struct Demo {
        #[arg(long)]
        count: u32,
    }

    fn call(args: &[&str]) -> Option<ExitCode> {
        run(
            "demo",
            "1",
            Demo::command(),
            args.iter().map(OsString::from).collect(),
        )
    }

    #[test]
    fn check_args_parses_without_running() {
        assert_eq!(
            call(&["check-args", "--count", "3"]),
            Some(ExitCode::SUCCESS)
        );
        assert_eq!(
            call(&["check-args", "--count", "x"]),
            Some(ExitCode::from(2))
        );
        assert_eq!(call(&["check-args", "--version"]), Some(ExitCode::SUCCESS));
        assert_eq!(call(&["--count", "3"]), None);
        assert_eq!(call(&[]), None);
    }

    #[test]
    fn generate_man_writes_the_page() {
        let dir = std::env::temp_dir().join(format!("cli-docs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let d = dir.to_str().unwrap();
        assert_eq!(call(&["generate-man", d]), Some(ExitCode::SUCCESS));
        let page = std::fs::read_to_string(dir.join("demo.1")).unwrap();
        assert!(page.contains(".TH demo 1"), "{page}");
        assert!(page.contains("count"), "{page}");
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(call(&["generate-man"]), Some(ExitCode::from(2)));
    }
}
