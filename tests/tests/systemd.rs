//! Running under systemd: the units in dist/ verify, the example configuration
//! passes `meshd config check`, and meshd speaks the notify protocol (READY, WATCHDOG,
//! STOPPING) to a fake `$NOTIFY_SOCKET`. Plus configuration precedence through the
//! real binary (flag > environment > file).

use std::io::BufRead;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use mesh_tests::*;

fn dist(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../dist")
        .join(file)
}

/// The units in dist/ and the binary each starts.
const UNITS: [(&str, &str); 3] = [
    ("meshd.service", "meshd"),
    ("locksmith.service", "locksmith"),
    ("locksmith-fleetlock.service", "locksmith"),
];

/// `systemd-analyze security`'s overall exposure of each unit is the one the README
/// records (a hardening change shows up in both, or the test fails).
#[test]
fn units_exposure_scores_are_the_readmes() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    for (unit, _) in UNITS {
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(dist(unit))
            .output()
            .expect("systemd-analyze (installed by scripts/test)");
        let text = String::from_utf8_lossy(&out.stdout);
        let score = text
            .lines()
            .find_map(|l| l.split_once(&format!("exposure level for {unit}: ")))
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no exposure level for {unit}:\n{text}"))
            .to_string();
        let row = format!("| `{unit}` | {score} |");
        assert!(readme.contains(&row), "README lacks the row {row:?}");
    }
}

#[test]
fn units_pass_systemd_analyze_verify() {
    assert!(
        Command::new("systemd-analyze")
            .arg("--version")
            .output()
            .is_ok(),
        "systemd-analyze is not installed: the README's test command (scripts/test) \
         installs it (Debian's systemd package)"
    );
    let dir = tempfile::tempdir().unwrap();
    let mut units = Vec::new();
    for (unit, bin) in UNITS {
        // verify checks that ExecStart exists: point it at the binaries just built.
        let text = std::fs::read_to_string(dist(unit)).unwrap();
        let text = text.replace(&format!("/usr/bin/{bin}"), binary(bin).to_str().unwrap());
        let path = dir.path().join(unit);
        std::fs::write(&path, text).unwrap();
        units.push(path);
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&units)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "{stderr}");
}

#[test]
fn meshd_service_runs_meshd_notify_with_state_in_var_lib() {
    let unit = std::fs::read_to_string(dist("meshd.service")).unwrap();
    for line in [
        "Type=notify",
        "User=meshd",
        "StateDirectory=meshd",
        "ExecStart=/usr/bin/meshd --config /etc/meshd/meshd.yaml",
        "CapabilityBoundingSet=\n",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter=@system-service",
        "LimitNOFILE=",
    ] {
        assert!(unit.contains(line), "meshd.service lacks {line:?}");
    }
    let yaml = std::fs::read_to_string(dist("meshd.yaml")).unwrap();
    assert!(yaml.contains("data-dir: /var/lib/meshd/"), "{yaml}");
}

/// `meshd config check FILE`: (exit code, stdout, stderr).
fn config_check(file: &Path) -> (Option<i32>, String, String) {
    let out = Command::new(binary("meshd"))
        .args(["config", "check"])
        .arg(file)
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn example_and_default_configs_pass_config_check() {
    // The example names the key file a real member has; check it with one.
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("mesh.key");
    let keygen = Command::new(binary("meshd"))
        .arg("keygen")
        .output()
        .unwrap();
    assert!(keygen.status.success());
    assert_eq!(
        keygen.stdout.len(),
        45,
        "44 base64 characters and a newline"
    );
    std::fs::write(&key, &keygen.stdout).unwrap();
    let yaml = std::fs::read_to_string(dist("meshd.yaml")).unwrap();
    assert!(yaml.contains("password-file: /etc/meshd/mesh.key\n"));
    let example = dir.path().join("meshd.yaml");
    std::fs::write(
        &example,
        yaml.replace("/etc/meshd/mesh.key", key.to_str().unwrap()),
    )
    .unwrap();
    let (code, stdout, stderr) = config_check(&example);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, format!("{}: ok\n", example.display()));
    // Without the key, the example's non-loopback mesh listener is refused.
    std::fs::write(
        &example,
        yaml.replace("password-file: /etc/meshd/mesh.key\n", ""),
    )
    .unwrap();
    let (code, _, stderr) = config_check(&example);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("meshd keygen > mesh.key"), "{stderr}");

    let default = Command::new(binary("meshd"))
        .args(["config", "default"])
        .output()
        .unwrap();
    assert!(default.status.success());
    let f = dir.path().join("default.yaml");
    std::fs::write(&f, &default.stdout).unwrap();
    let (code, _, stderr) = config_check(&f);
    assert_eq!(code, Some(0), "{stderr}");

    std::fs::write(&f, "name: a\nheartbeat-ticks: 0\n").unwrap();
    let (code, _, stderr) = config_check(&f);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains(&format!("{}:2: heartbeat-ticks", f.display())),
        "{stderr}"
    );
}

/// meshd refusing to start; returns its stderr.
fn refused(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new(binary("meshd"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{args:?} {env:?} should be refused"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn flag_beats_environment_beats_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("m.yaml");
    std::fs::write(&f, "name: a\ntick: 0s\n").unwrap();
    let fs = f.to_str().unwrap();
    let err = refused(&["--config", fs], &[]);
    assert_eq!(err, format!("meshd: {fs}:2: tick: must be positive\n"));
    let err = refused(&["--config", fs, "--tick=0ms"], &[("MESHD_TICK", "10ms")]);
    assert_eq!(err, "meshd: --tick: must be positive\n");
    std::fs::write(&f, "name: a\ntick: 10ms\n").unwrap();
    let err = refused(&["run", "--config", fs], &[("MESHD_TICK", "0ms")]);
    assert_eq!(err, "meshd: MESHD_TICK (environment): must be positive\n");
}

#[test]
fn a_network_mesh_listener_needs_a_key_or_an_explicit_insecure_mode() {
    let err = refused(&["--listen-mesh=0.0.0.0:0"], &[]);
    assert!(
        err.starts_with("meshd: --listen-mesh 0.0.0.0:0 is reachable from other hosts")
            && err.contains("--password-file mesh.key")
            && err.contains("--insecure-mesh"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("m.yaml");
    std::fs::write(&f, "listen-mesh: 0.0.0.0:0\n").unwrap();
    let err = refused(&["--config", f.to_str().unwrap()], &[]);
    assert!(err.contains("is reachable from other hosts"), "{err}");
    // The explicit insecure mode starts, and says what it means at every start.
    for (args, env) in [
        (vec!["--insecure-mesh"], vec![]),
        (vec![], vec![("MESHD_INSECURE_MESH", "true")]),
    ] {
        let data = tempfile::tempdir().unwrap();
        let mut child = Command::new(binary("meshd"))
            .arg(format!("--data-dir={}", data.path().display()))
            .arg(format!("--listen-client={}", free_addr()))
            .arg("--listen-mesh=0.0.0.0:0")
            .arg("--listen-metrics=off")
            .args(args)
            .envs(env)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let warned = lines.any(|l| {
            let l = l.unwrap();
            l.contains("WARN") && l.contains("--insecure-mesh") && l.contains("read every key")
        });
        let _ = child.kill();
        let _ = child.wait();
        assert!(warned, "no warning about the insecure mesh");
    }
}

#[test]
fn meshd_tells_systemd_ready_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut child = Command::new(binary("meshd"))
        .arg("--name=sd")
        .arg(format!("--data-dir={}", dir.path().join("data").display()))
        .arg(format!("--listen-client={}", free_addr()))
        .arg(format!("--listen-mesh={}", free_addr()))
        .arg(format!("--listen-metrics={}", free_addr()))
        .arg("--tick=20ms")
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "200000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let recv = || {
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).expect("a notification within 30s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let first = recv();
    assert!(first.lines().any(|l| l == "READY=1"), "{first:?}");
    for _ in 0..3 {
        assert_eq!(recv(), "WATCHDOG=1");
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let stopping = loop {
        let m = recv();
        if m != "WATCHDOG=1" {
            break m;
        }
    };
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    assert!(child.wait().unwrap().success());
}
