//! Harness for cluster-level tests: real members on loopback with their own data dirs,
//! in-process ([`InProcessCluster`]) or as spawned `meshd` processes
//! ([`ProcessCluster`]), both behind the [`Cluster`] trait, reached through the
//! independent `etcd-client` crate.
//! Scenarios wait on observable state with a deadline, never on fixed sleeps.

pub mod chaos;
pub mod cluster;
pub mod hostile_peer;
pub mod linearizability;
pub mod sim;

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mesh_core::membership::autopilot::AutopilotConfig;
use mesh_core::server::{Server, ServerConfig};

pub use cluster::Cluster;

/// A loopback address with a port that was free a moment ago.
/// A duration as the long-running tools take it: `90s`, `10m`, `2h` (a bare number is
/// seconds).
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("bad duration {s:?}: use e.g. 90s, 10m, 2h"))?;
    Ok(match unit {
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => anyhow::bail!("bad duration {s:?}: use e.g. 90s, 10m, 2h"),
    })
}

pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// A loopback port nothing listens on now, below the kernel's ephemeral range. A port
/// from binding port 0 is an ephemeral one, and any process's outgoing connection can
/// take it before the member it was handed to binds it: tests failed now and then with
/// "Address already in use" that way. Ports below the range are only ever taken by
/// listeners; each test process walks them from its own starting point.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOWEST: u32 = 10_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    if ephemeral_low <= LOWEST + 1_000 {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
        return l.local_addr().expect("local addr").port();
    }
    let span = ephemeral_low - LOWEST;
    let start = std::process::id().wrapping_mul(7_919);
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOWEST + start.wrapping_add(n) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {LOWEST}..{ephemeral_low}");
}

/// Retries `f` until it returns `Some` or `deadline` passes (then panics with `what`).
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > end {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An etcd-client connected to one endpoint, with a short per-request timeout.
pub async fn etcd_client(addr: SocketAddr) -> etcd_client::Client {
    let opts = etcd_client::ConnectOptions::new()
        .with_timeout(Duration::from_secs(5))
        .with_connect_timeout(Duration::from_secs(2));
    etcd_client::Client::connect([format!("http://{addr}")], Some(opts))
        .await
        .expect("etcd-client connects (lazily)")
}

/// Keeps `lease` alive through `c` every `every` until aborted. Like etcd's clientv3,
/// it opens a new stream when one fails (e.g. during an election).
pub fn keep_alive(
    mut c: etcd_client::Client,
    lease: i64,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if let Ok((mut keeper, mut stream)) = c.lease_keep_alive(lease).await {
                loop {
                    if keeper.keep_alive().await.is_err() {
                        break;
                    }
                    match stream.message().await {
                        Ok(Some(r)) if r.ttl() > 0 => {}
                        _ => break,
                    }
                    tokio::time::sleep(every).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// Status of one member, or None when it does not answer.
pub async fn status(addr: SocketAddr) -> Option<etcd_client::StatusResponse> {
    let mut c = etcd_client(addr).await;
    tokio::time::timeout(Duration::from_secs(2), c.status())
        .await
        .ok()?
        .ok()
}

/// Waits until every address answers and all agree on one leader; returns its ID.
pub async fn wait_for_leader(addrs: &[SocketAddr]) -> u64 {
    wait_for_leader_other_than(addrs, 0).await
}

/// Like [`wait_for_leader`], for a leader that is not `old` (after stopping `old`).
pub async fn wait_for_leader_other_than(addrs: &[SocketAddr], old: u64) -> u64 {
    eventually(
        "a leader all members agree on",
        Duration::from_secs(30),
        || agreed_leader(addrs, old),
    )
    .await
}

/// The leader every address names right now, if they all answer and agree (and it is
/// not `old`).
pub async fn agreed_leader(addrs: &[SocketAddr], old: u64) -> Option<u64> {
    let mut leader = None;
    for a in addrs {
        let s = status(*a).await?;
        if s.leader() == 0 || s.leader() == old || leader.is_some_and(|l| l != s.leader()) {
            return None;
        }
        leader = Some(s.leader());
    }
    leader
}

/// Puts with retries across a leader change (only retrying errors that say the write
/// was not applied or may be re-applied harmlessly, since values are idempotent here).
pub async fn put_retrying(addrs: &[SocketAddr], key: &str, value: &str) -> i64 {
    eventually(&format!("put {key}"), Duration::from_secs(30), || async {
        for a in addrs {
            let mut c = etcd_client(*a).await;
            if let Ok(r) = c.put(key, value, None).await {
                return Some(r.header().expect("header").revision());
            }
        }
        None
    })
    .await
}

/// A member's own name on the mesh, from its client address (link faults name peers
/// by it); None until the member answers.
pub async fn mesh_name(addr: SocketAddr) -> Option<u64> {
    use mesh_core::proto::meshpb::{mesh_client::MeshClient, MeshPeersRequest};
    let mut m = MeshClient::connect(format!("http://{addr}")).await.ok()?;
    let peers = m.peers(MeshPeersRequest {}).await.ok()?.into_inner();
    peers.peers.iter().find(|p| p.is_self).map(|p| p.name)
}

/// Settings for test clusters: short ticks, small log.
#[derive(Clone, Debug)]
pub struct ClusterOpts {
    pub tick: Duration,
    pub election_ticks: usize,
    pub snapshot_count: u64,
    pub catch_up_entries: u64,
    /// Growth and healing (short intervals; a long dead-voter timeout unless a test
    /// is about healing).
    pub autopilot: AutopilotConfig,
    pub password: Option<Vec<u8>>,
    /// TLS on every member's client API.
    pub client_tls: Option<mesh_core::tls::ServerTls>,
    /// Serve `/metrics` and `/health` (off by default: one port fewer to race for).
    pub metrics: bool,
    /// Serve the test-only FaultInjection service ([`Cluster::partition`] needs it).
    pub fault_injection: bool,
}

impl Default for ClusterOpts {
    fn default() -> Self {
        ClusterOpts {
            tick: Duration::from_millis(25),
            election_ticks: 12,
            snapshot_count: 10_000,
            catch_up_entries: 5_000,
            autopilot: AutopilotConfig {
                growth: true,
                voters: 3,
                dead_voter_timeout: Duration::from_secs(120),
                stabilization: Duration::from_millis(500),
                interval: Duration::from_millis(100),
            },
            password: None,
            client_tls: None,
            metrics: false,
            fault_injection: false,
        }
    }
}

impl ClusterOpts {
    /// A member configuration with these options (no cluster flags set).
    pub fn config(&self, name: &str, dir: &std::path::Path) -> ServerConfig {
        let mut c = ServerConfig::new(name);
        c.data_dir = dir.join(name);
        c.listen_client = free_addr();
        c.listen_mesh = free_addr();
        c.listen_metrics = self.metrics.then(free_addr);
        c.tick = self.tick;
        c.election_ticks = self.election_ticks;
        c.heartbeat_ticks = 2;
        c.snapshot_count = self.snapshot_count;
        c.catch_up_entries = self.catch_up_entries;
        c.request_timeout = Duration::from_secs(5);
        c.autopilot = self.autopilot.clone();
        c.password = self.password.clone();
        c.client_tls = self.client_tls.clone();
        c.unsafe_fault_injection = self.fault_injection;
        c.mesh_heartbeat = Duration::from_millis(100);
        c.mesh_gossip_interval = Duration::from_millis(100);
        c
    }
}

/// Members running inside the test process.
pub struct InProcessCluster {
    pub dir: tempfile::TempDir,
    pub configs: Vec<ServerConfig>,
    pub servers: Vec<Option<Server>>,
}

impl InProcessCluster {
    pub async fn start(n: usize, opts: ClusterOpts) -> InProcessCluster {
        let (dir, configs) = Self::configure(n, opts);
        Self::start_configured(dir, configs).await
    }

    /// The configs `start` would use (members `m0..`, fresh ports, data dirs under a new
    /// temp dir), for tests that change them or prepare the data dirs first.
    pub fn configure(n: usize, opts: ClusterOpts) -> (tempfile::TempDir, Vec<ServerConfig>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let names: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
        let mesh: Vec<SocketAddr> = (0..n).map(|_| free_addr()).collect();
        let initial: Vec<(String, String)> = names
            .iter()
            .zip(&mesh)
            .map(|(n, a)| (n.clone(), a.to_string()))
            .collect();
        let configs: Vec<ServerConfig> = (0..n)
            .map(|i| {
                let mut c = opts.config(&names[i], dir.path());
                c.listen_mesh = mesh[i];
                c.initial_cluster = Some(initial.clone());
                c
            })
            .collect();
        (dir, configs)
    }

    /// Starts members from `configs` (see [`InProcessCluster::configure`]).
    pub async fn start_configured(
        dir: tempfile::TempDir,
        configs: Vec<ServerConfig>,
    ) -> InProcessCluster {
        // MESHD_TEST_LOG=<filter> (e.g. `info`, `mesh_core::raft=debug`): the members'
        // logs, captured per test as its output.
        if let Ok(filter) = std::env::var("MESHD_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
        let mut servers = Vec::new();
        for c in &configs {
            servers.push(Some(Server::start(c.clone()).await.expect("member starts")));
        }
        InProcessCluster {
            dir,
            configs,
            servers,
        }
    }

    pub fn addr(&self, i: usize) -> SocketAddr {
        self.configs[i].listen_client
    }

    /// Client addresses of the members that are running.
    pub fn live_addrs(&self) -> Vec<SocketAddr> {
        (0..self.configs.len())
            .filter(|i| self.servers[*i].is_some())
            .map(|i| self.addr(i))
            .collect()
    }

    /// Index of the member with this Raft ID.
    pub fn index_of(&self, member_id: u64) -> usize {
        self.servers
            .iter()
            .position(|s| {
                s.as_ref()
                    .is_some_and(|s| s.node().status.member_id == member_id)
            })
            .expect("member is running")
    }

    /// Starts one more node with `cfg` (e.g. joining through `--peer`); returns its index.
    pub async fn add(&mut self, cfg: ServerConfig) -> usize {
        let server = Server::start(cfg.clone()).await.expect("node starts");
        self.configs.push(cfg);
        self.servers.push(Some(server));
        self.configs.len() - 1
    }

    pub async fn stop(&mut self, i: usize) {
        if let Some(s) = self.servers[i].take() {
            s.shutdown().await.expect("clean shutdown");
        }
    }

    pub async fn restart(&mut self, i: usize) {
        assert!(self.servers[i].is_none(), "member {i} is running");
        self.servers[i] = Some(
            Server::start(self.configs[i].clone())
                .await
                .expect("member restarts"),
        );
    }
}

/// Where cargo put the workspace binaries (built by the test command before the tests).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>; a program of this
    // package (target/<profile>/chaos) finds it beside itself.
    let beside = exe.parent().expect("exe dir").join(name);
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = if beside.exists() {
        beside
    } else {
        dir.join(name)
    };
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace` — the README's test command does)",
        path.display()
    );
    path
}

/// One spawned `meshd`.
pub struct Process {
    pub name: String,
    pub client: SocketAddr,
    /// `/metrics` and `/health`.
    pub metrics: SocketAddr,
    pub args: Vec<String>,
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Process {
    /// Starts the process (again) with its arguments, appending to its log.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(binary("meshd"))
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("spawn meshd");
        self.child = Some(child);
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        c.wait().ok()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Members as separate `meshd` processes.
pub struct ProcessCluster {
    pub dir: tempfile::TempDir,
    pub procs: Vec<Process>,
}

impl ProcessCluster {
    pub fn start(n: usize, opts: ClusterOpts) -> ProcessCluster {
        ProcessCluster::start_with(n, opts, |_, mesh| {
            let initial = (0..mesh.len())
                .map(|i| format!("p{i}={}", mesh[i]))
                .collect::<Vec<_>>()
                .join(",");
            vec![format!("--initial-cluster={initial}")]
        })
    }

    /// Starts `n` processes named p0.. with the common flags plus `cluster_flags(i,
    /// mesh addresses)` (how they form or join a cluster).
    pub fn start_with(
        n: usize,
        opts: ClusterOpts,
        cluster_flags: impl Fn(usize, &[SocketAddr]) -> Vec<String>,
    ) -> ProcessCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let mesh: Vec<SocketAddr> = (0..n).map(|_| free_addr()).collect();
        let mut procs = Vec::new();
        for (i, m) in mesh.iter().enumerate() {
            let client = free_addr();
            let metrics = free_addr();
            let name = format!("p{i}");
            let mut args = vec![
                format!("--name={name}"),
                format!("--data-dir={}", dir.path().join(&name).display()),
                format!("--listen-client={client}"),
                format!("--listen-mesh={m}"),
                format!("--listen-metrics={metrics}"),
                format!("--tick={}ms", opts.tick.as_millis()),
                format!("--election-ticks={}", opts.election_ticks),
                "--heartbeat-ticks=2".to_string(),
                format!("--snapshot-count={}", opts.snapshot_count),
                format!("--catch-up-entries={}", opts.catch_up_entries),
                "--mesh-heartbeat=100ms".to_string(),
                "--mesh-gossip-interval=100ms".to_string(),
            ];
            if opts.fault_injection {
                args.push("--unsafe-fault-injection".to_string());
            }
            args.extend(cluster_flags(i, &mesh));
            let mut p = Process {
                log: dir.path().join(format!("{name}.log")),
                name,
                client,
                metrics,
                args,
                child: None,
            };
            p.spawn();
            procs.push(p);
        }
        ProcessCluster { dir, procs }
    }

    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.procs.iter().map(|p| p.client).collect()
    }

    pub fn restart(&mut self, i: usize) {
        assert!(self.procs[i].child.is_none(), "process {i} is running");
        self.procs[i].spawn();
    }

    /// The log of member `i`, for failure messages.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.procs[i].log).unwrap_or_default()
    }
}

/// Copies a directory tree (a data dir with its log directory) into `to`, which exists.
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    for f in std::fs::read_dir(from).unwrap() {
        let f = f.unwrap();
        let target = to.join(f.file_name());
        if f.file_type().unwrap().is_dir() {
            std::fs::create_dir(&target).unwrap();
            copy_dir(&f.path(), &target);
        } else {
            std::fs::copy(f.path(), target).unwrap();
        }
    }
}

/// `GET path` over HTTP/1.1 to `addr`: the status code and body, or None when the
/// connection fails.
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

/// Certificates made at test time: a CA, a server certificate for 127.0.0.1 and
/// localhost, and a client certificate, all as PEM files in a temp dir.
pub struct TestCerts {
    _dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TestCerts {
    pub fn generate() -> TestCerts {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair, KeyUsagePurpose,
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, pem: String| {
            let p = dir.path().join(name);
            std::fs::write(&p, pem).expect("write pem");
            p
        };
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "meshd test CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let leaf = |sans: Vec<String>, cn: &str, usage: ExtendedKeyUsagePurpose| {
            let mut p = CertificateParams::new(sans).unwrap();
            p.distinguished_name.push(DnType::CommonName, cn);
            p.extended_key_usages = vec![usage];
            let key = KeyPair::generate().unwrap();
            let cert = p.signed_by(&key, &ca).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        // The server certificate also serves as the member's client certificate when
        // it forwards to another member under client-certificate auth.
        let mut server =
            CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
        server
            .distinguished_name
            .push(DnType::CommonName, "meshd test server");
        server.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let server_key = KeyPair::generate().unwrap();
        let server_cert = server.signed_by(&server_key, &ca).unwrap();
        let (client_cert, client_key) = leaf(
            vec![],
            "meshd test client",
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        TestCerts {
            ca: write("ca.pem", ca.pem()),
            server_cert: write("server.pem", server_cert.pem()),
            server_key: write("server-key.pem", server_key.serialize_pem()),
            client_cert: write("client.pem", client_cert),
            client_key: write("client-key.pem", client_key),
            _dir: dir,
        }
    }

    /// The member-side settings: TLS with these certificates, optionally requiring
    /// client certificates.
    pub fn server_tls(&self, client_cert_auth: bool) -> mesh_core::tls::ServerTls {
        mesh_core::tls::ServerTls {
            cert_file: self.server_cert.clone(),
            key_file: self.server_key.clone(),
            client_cert_auth,
            trusted_ca_file: Some(self.ca.clone()),
        }
    }

    /// An etcd-client over TLS to `addr`, trusting the test CA, with the client
    /// certificate if `with_cert`.
    pub async fn etcd_client(&self, addr: SocketAddr, with_cert: bool) -> etcd_client::Client {
        use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};
        let mut tls = TlsOptions::new()
            .ca_certificate(Certificate::from_pem(std::fs::read(&self.ca).unwrap()))
            .domain_name("localhost");
        if with_cert {
            tls = tls.identity(Identity::from_pem(
                std::fs::read(&self.client_cert).unwrap(),
                std::fs::read(&self.client_key).unwrap(),
            ));
        }
        let opts = ConnectOptions::new()
            .with_timeout(Duration::from_secs(5))
            .with_connect_timeout(Duration::from_secs(2))
            .with_tls(tls);
        etcd_client::Client::connect([format!("https://{addr}")], Some(opts))
            .await
            .expect("etcd-client connects (lazily)")
    }

    /// meshd's flags for [`TestCerts::server_tls`].
    pub fn meshd_flags(&self, client_cert_auth: bool) -> Vec<String> {
        let mut v = vec![
            format!("--cert-file={}", self.server_cert.display()),
            format!("--key-file={}", self.server_key.display()),
            format!("--trusted-ca-file={}", self.ca.display()),
        ];
        if client_cert_auth {
            v.push("--client-cert-auth".into());
        }
        v
    }
}

/// The directory of the official etcd 3.5.1 binaries (etcd, etcdctl, etcdutl), fetched
/// by `scripts/etcd-3.5.1` on first use.
pub fn etcd_351_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace");
    let out = Command::new(root.join("scripts/etcd-3.5.1"))
        .current_dir(root)
        .output()
        .expect("run scripts/etcd-3.5.1");
    assert!(
        out.status.success(),
        "scripts/etcd-3.5.1 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).expect("utf-8 path").trim())
}

/// A real single-member etcd (Debian's 3.4 `etcd` from PATH, or another binary) on
/// free loopback ports, killed on drop.
pub struct RealEtcd {
    pub client: SocketAddr,
    child: Child,
    pub dir: tempfile::TempDir,
}

impl RealEtcd {
    /// Starts `binary` on a fresh data dir and waits until it answers Status.
    pub async fn start(binary: &Path) -> RealEtcd {
        let dir = tempfile::tempdir().expect("tempdir");
        RealEtcd::start_in(binary, dir, "e").await
    }

    /// Starts `binary` named `name` on the data dir `dir/data` (restored or fresh).
    pub async fn start_in(binary: &Path, dir: tempfile::TempDir, name: &str) -> RealEtcd {
        let client = free_addr();
        let peer = free_addr();
        let log = std::fs::File::create(dir.path().join("etcd.log")).expect("log");
        let child = Command::new(binary)
            .arg(format!("--name={name}"))
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--listen-client-urls=http://{client}"))
            .arg(format!("--advertise-client-urls=http://{client}"))
            .arg(format!("--listen-peer-urls=http://{peer}"))
            .arg(format!("--initial-advertise-peer-urls=http://{peer}"))
            .arg(format!("--initial-cluster={name}=http://{peer}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", binary.display()));
        let etcd = RealEtcd { client, child, dir };
        eventually("etcd to serve", Duration::from_secs(30), || async {
            status(client).await
        })
        .await;
        etcd
    }

    /// What etcd logged so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }
}

impl Drop for RealEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
