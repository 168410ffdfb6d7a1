//! Mesh scenarios on real loopback TCP: 50-peer line, ring and random graphs (routes,
//! unicast across hops, broadcast), partitions and heals, passwords, hostile input,
//! accept-rate limiting, tie-breaks and discovery.
use mesh_core::crdt::CounterGossiper;
use mesh_core::mesh::{
    GossipData, GossipError, Gossiper, LinkFault, Mesh, MeshConfig, MeshError, MeshKey, PeerName,
};
use rand::{Rng, SeedableRng};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const DEADLINE: Duration = Duration::from_secs(60);

/// Short intervals, seeds only (target_degree 0) so a test's shape is kept.
fn fast_config(name: PeerName, addr: &str) -> MeshConfig {
    let mut cfg = MeshConfig::new(name, &format!("p{name}"), addr);
    cfg.heartbeat = Duration::from_millis(50);
    cfg.dead_after = Duration::from_millis(1500);
    cfg.gossip_interval = Duration::from_millis(50);
    cfg.reconnect_min = Duration::from_millis(50);
    cfg.reconnect_max = Duration::from_millis(400);
    cfg.target_degree = 0;
    cfg.accept_per_sec = 1000;
    cfg
}

/// The mesh key a password stretches to (as meshd derives it).
fn key(password: &str) -> MeshKey {
    MeshKey::from_secret(password.as_bytes(), "test-token").0
}

async fn bind() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap().to_string();
    (l, a)
}

/// Polls `cond` every 20 ms until it holds; panics with `what` at the deadline.
async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !cond() {
        if start.elapsed() > DEADLINE {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Records unicasts and broadcasts; broadcasts are a grow-only set of byte strings, and
/// it never gossips, so a broadcast reaching everyone proves the tree relay.
#[derive(Default)]
struct Recorder {
    unicasts: Mutex<Vec<(PeerName, Vec<u8>)>>,
    seen: Mutex<BTreeSet<Vec<u8>>>,
}

struct Items(Vec<Vec<u8>>);
impl GossipData for Items {
    fn encode(&self) -> Vec<Vec<u8>> {
        self.0.clone()
    }
    fn merge(&mut self, other: &Self) {
        self.0.extend(other.0.iter().cloned());
        self.0.sort();
        self.0.dedup();
    }
}

impl Recorder {
    fn add(&self, u: &[u8]) -> Option<Box<dyn GossipData>> {
        let new = self.seen.lock().unwrap().insert(u.to_vec());
        new.then(|| Box::new(Items(vec![u.to_vec()])) as Box<dyn GossipData>)
    }
    fn got_unicast(&self, msg: &[u8]) -> bool {
        self.unicasts.lock().unwrap().iter().any(|(_, m)| m == msg)
    }
    fn saw(&self, msg: &[u8]) -> bool {
        self.seen.lock().unwrap().contains(msg)
    }
}

impl Gossiper for Recorder {
    fn on_unicast(&self, src: PeerName, msg: &[u8]) -> Result<(), GossipError> {
        self.unicasts.lock().unwrap().push((src, msg.to_vec()));
        Ok(())
    }
    fn on_broadcast(
        &self,
        _: PeerName,
        u: &[u8],
    ) -> Result<Option<Box<dyn GossipData>>, GossipError> {
        Ok(self.add(u))
    }
    fn gossip(&self) -> Option<Box<dyn GossipData>> {
        None
    }
    fn on_gossip(&self, u: &[u8]) -> Result<Option<Box<dyn GossipData>>, GossipError> {
        Ok(self.add(u))
    }
}

/// dst → (next hop, hops) as one peer sees it.
type RouteTable = HashMap<PeerName, (Option<PeerName>, Option<u32>)>;

struct Net {
    meshes: Vec<Arc<Mesh>>,
    addrs: Vec<String>,
    recorders: Vec<Arc<Recorder>>,
    channels: Vec<Arc<mesh_core::mesh::GossipChannel>>,
}

/// Starts `n` peers named 1..=n; peer i (0-based) seeds the addresses of `edges[i]`.
async fn start_net(n: usize, edges: &[Vec<usize>], tweak: impl Fn(&mut MeshConfig)) -> Net {
    let mut listeners = Vec::new();
    let mut addrs = Vec::new();
    for _ in 0..n {
        let (l, a) = bind().await;
        listeners.push(l);
        addrs.push(a);
    }
    let mut net = Net {
        meshes: vec![],
        addrs: addrs.clone(),
        recorders: vec![],
        channels: vec![],
    };
    for (i, l) in listeners.into_iter().enumerate() {
        let mut cfg = fast_config(i as u64 + 1, &addrs[i]);
        cfg.seeds = edges[i].iter().map(|&j| addrs[j].clone()).collect();
        tweak(&mut cfg);
        let m = Mesh::start(cfg, l);
        let r = Arc::new(Recorder::default());
        net.channels.push(m.register("test", r.clone()));
        net.recorders.push(r);
        net.meshes.push(m);
    }
    net
}

impl Net {
    /// Every peer sees every peer reachable, and every route agrees with `hops(a, b)`.
    fn converged(&self, hops: &dyn Fn(usize, usize) -> u32) -> bool {
        let n = self.meshes.len();
        self.meshes.iter().enumerate().all(|(i, m)| {
            let peers = m.peers();
            peers.len() == n
                && peers
                    .iter()
                    .all(|p| p.reachable && p.hops == Some(hops(i, p.name as usize - 1)))
        })
    }

    /// Routes are consistent: each next hop is one hop closer, as that hop sees it.
    fn routes_consistent(&self) -> bool {
        let tables: Vec<RouteTable> = self
            .meshes
            .iter()
            .map(|m| {
                m.peers()
                    .into_iter()
                    .map(|p| (p.name, (p.next_hop, p.hops)))
                    .collect()
            })
            .collect();
        let n = self.meshes.len();
        tables.iter().enumerate().all(|(i, t)| {
            t.len() == n
                && t.iter().all(|(&dst, &(next, hops))| {
                    if dst == i as u64 + 1 {
                        return true;
                    }
                    let (Some(next), Some(hops)) = (next, hops) else {
                        return false;
                    };
                    let via = tables[next as usize - 1].get(&dst).and_then(|x| x.1);
                    via == Some(hops - 1)
                        && tables[dst as usize - 1][&(i as u64 + 1)].1 == Some(hops)
                })
        })
    }

    async fn unicast_and_broadcast(&self, from: usize, to: usize) {
        let msg = format!("hello {from}->{to}").into_bytes();
        let dst = to as u64 + 1;
        // A unicast may race the last route changes; retry until it lands.
        let mut attempts = 0;
        wait_for("unicast across the mesh", || {
            attempts += 1;
            if attempts % 25 == 1 {
                let _ = self.channels[from].send_unicast(dst, msg.clone());
            }
            self.recorders[to].got_unicast(&msg)
        })
        .await;
        let (src, _) = self.recorders[to].unicasts.lock().unwrap()[0].clone();
        assert_eq!(src, from as u64 + 1);
        let b = format!("broadcast from {from}").into_bytes();
        self.channels[from].broadcast(Box::new(Items(vec![b.clone()])));
        wait_for("broadcast reaches every peer", || {
            self.recorders
                .iter()
                .enumerate()
                .all(|(i, r)| i == from || r.saw(&b))
        })
        .await;
    }

    async fn shutdown(self) {
        for m in &self.meshes {
            m.shutdown().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn line_of_50() {
    let n = 50;
    let edges: Vec<Vec<usize>> = (0..n)
        .map(|i| if i == 0 { vec![] } else { vec![i - 1] })
        .collect();
    let net = start_net(n, &edges, |_| {}).await;
    let hops = |a: usize, b: usize| a.abs_diff(b) as u32;
    wait_for("line topology converges", || net.converged(&hops)).await;
    assert!(net.routes_consistent());
    net.unicast_and_broadcast(0, n - 1).await;
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_of_50() {
    let n = 50;
    let edges: Vec<Vec<usize>> = (0..n).map(|i| vec![(i + n - 1) % n]).collect();
    let net = start_net(n, &edges, |_| {}).await;
    let hops = |a: usize, b: usize| {
        let d = a.abs_diff(b);
        d.min(n - d) as u32
    };
    wait_for("ring topology converges", || net.converged(&hops)).await;
    assert!(net.routes_consistent());
    net.unicast_and_broadcast(0, n / 2).await;
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_sparse_50() {
    let n = 50;
    let seed: u64 = rand::rng().random();
    println!("random_sparse_50 seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Each peer seeds one earlier peer (so the graph is connected) and sometimes another.
    let edges: Vec<Vec<usize>> = (0..n)
        .map(|i| {
            let mut e = Vec::new();
            if i > 0 {
                e.push(rng.random_range(0..i));
            }
            if i > 1 && rng.random_bool(0.3) {
                let j = rng.random_range(0..i);
                if !e.contains(&j) {
                    e.push(j);
                }
            }
            e
        })
        .collect();
    let net = start_net(n, &edges, |_| {}).await;
    wait_for("random topology converges", || {
        net.meshes
            .iter()
            .all(|m| m.peers().iter().filter(|p| p.reachable).count() == n)
            && net.routes_consistent()
    })
    .await;
    // The farthest pair from peer 0.
    let far = net.meshes[0]
        .peers()
        .into_iter()
        .max_by_key(|p| p.hops)
        .unwrap();
    net.unicast_and_broadcast(0, far.name as usize - 1).await;
    net.shutdown().await;
}

/// Line 1-2-3-4; peer 2 cuts its link to 3; counters move on both sides; heal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_splits_and_heal_rejoins_with_counters_converging() {
    let edges = vec![vec![], vec![0], vec![1], vec![2]];
    let net = start_net(4, &edges, |_| {}).await;
    let counters: Vec<_> = net
        .meshes
        .iter()
        .map(|m| CounterGossiper::register(m, "counters"))
        .collect();
    let hops = |a: usize, b: usize| a.abs_diff(b) as u32;
    wait_for("line converges", || net.converged(&hops)).await;

    let all_drop = LinkFault {
        drop_in: true,
        drop_out: true,
        delay: None,
    };
    net.meshes[1].set_link_fault(3, all_drop);
    let sees = |i: usize, name: PeerName| {
        net.meshes[i]
            .peers()
            .iter()
            .any(|p| p.name == name && p.reachable)
    };
    wait_for("partition splits the mesh", || {
        !sees(0, 3) && !sees(0, 4) && !sees(3, 1) && !sees(3, 2)
    })
    .await;

    counters[0].incr("jobs", 5);
    counters[1].incr("jobs", 1);
    counters[3].incr("jobs", -2);
    wait_for("each side converges on its own", || {
        counters[0].get("jobs") == 6
            && counters[1].get("jobs") == 6
            && counters[2].get("jobs") == -2
    })
    .await;
    assert_eq!(counters[3].get("jobs"), -2, "nothing crosses the cut");

    net.meshes[1].clear_faults();
    wait_for("heal rejoins the mesh", || net.converged(&hops)).await;
    wait_for("counters converge after heal", || {
        counters.iter().all(|c| c.get("jobs") == 4)
    })
    .await;
    assert_eq!(counters[2].names(), vec!["jobs".to_string()]);
    net.shutdown().await;
}

/// A delay fault holds every frame back by the delay, in order, without spacing them
/// out: unicasts sent together arrive together, the delay after they were sent. (It
/// used to sleep the delay before each frame, which throttled the link to one frame
/// per delay, so its queue grew without bound and Raft saw a partition.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delay_fault_adds_latency_and_keeps_order() {
    let net = start_net(2, &[vec![], vec![0]], |_| {}).await;
    wait_for("pair connected", || {
        net.converged(&|a, b| a.abs_diff(b) as u32)
    })
    .await;
    let delay = Duration::from_millis(300);
    let n = 30u8;
    net.meshes[0].set_link_fault(
        2,
        LinkFault {
            delay: Some(delay),
            ..Default::default()
        },
    );
    let sent = tokio::time::Instant::now();
    for i in 0..n {
        net.channels[0].send_unicast(2, vec![i]).unwrap();
    }
    let arrived = |k: usize| net.recorders[1].unicasts.lock().unwrap().len() >= k;
    wait_for("the first delayed unicast", || arrived(1)).await;
    let first = sent.elapsed();
    wait_for("every delayed unicast", || arrived(n.into())).await;
    let all = sent.elapsed();
    let got: Vec<u8> = net.recorders[1]
        .unicasts
        .lock()
        .unwrap()
        .iter()
        .map(|(_, m)| m[0])
        .collect();
    assert_eq!(got, (0..n).collect::<Vec<_>>(), "in the order sent");
    assert!(first >= delay, "held back only {first:?}");
    // One delay per frame would take at least n delays.
    assert!(all < delay * n.into(), "spaced out: {all:?} for {n} frames");

    // Frames still held when the fault is cleared go before a frame written directly.
    net.meshes[0].set_link_fault(
        2,
        LinkFault {
            delay: Some(delay),
            ..Default::default()
        },
    );
    for i in n..n + 3 {
        net.channels[0].send_unicast(2, vec![i]).unwrap();
    }
    // Let the connection's task take them from its queue before the fault goes.
    tokio::time::sleep(Duration::from_millis(50)).await;
    net.meshes[0].clear_faults();
    net.channels[0].send_unicast_now(2, vec![n + 3]).unwrap();
    wait_for("the held and the direct unicasts", || {
        arrived(usize::from(n) + 4)
    })
    .await;
    let got: Vec<u8> = net.recorders[1]
        .unicasts
        .lock()
        .unwrap()
        .iter()
        .map(|(_, m)| m[0])
        .collect();
    assert_eq!(got, (0..n + 4).collect::<Vec<_>>(), "in the order sent");
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_connects_keep_one_connection_per_pair() {
    let edges = vec![vec![1], vec![0]];
    let net = start_net(2, &edges, |_| {}).await;
    wait_for("pair connected", || {
        net.converged(&|a, b| a.abs_diff(b) as u32)
    })
    .await;
    // Let both dials settle, then check there is exactly one connection, the same one.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (i, m) in net.meshes.iter().enumerate() {
        assert_eq!(m.stats().connections, 1);
        let me = m.peers().into_iter().find(|p| p.is_self).unwrap();
        let established: Vec<_> = me.connections.iter().filter(|c| c.established).collect();
        assert_eq!(established.len(), 1);
        // The connection dialed by the lower name (peer 1) wins on both ends.
        assert_eq!(established[0].outbound, i == 0);
    }
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_reaches_target_degree_and_connect_works_at_runtime() {
    // Everyone seeds peer 0 only; discovery must add links up to target_degree 3.
    let edges = vec![vec![], vec![0], vec![0], vec![0], vec![0]];
    let net = start_net(5, &edges, |c| c.target_degree = 3).await;
    wait_for("every peer has 3 connections", || {
        net.meshes.iter().all(|m| m.stats().connections >= 3)
    })
    .await;

    let changes = net.meshes[0].changes();
    let before = *changes.borrow();
    let (l, a) = bind().await;
    let late = Mesh::start(fast_config(9, &a), l);
    late.connect(&net.addrs[2]);
    wait_for("late peer joins via connect()", || {
        late.peers().iter().filter(|p| p.reachable).count() == 6
            && net.meshes[0]
                .peers()
                .iter()
                .any(|p| p.name == 9 && p.reachable)
    })
    .await;
    assert!(
        *changes.borrow() > before,
        "changes() bumped when the peer joined"
    );
    late.set_meta(b"role=server".to_vec());
    wait_for("meta gossiped", || {
        net.meshes[4]
            .peers()
            .iter()
            .any(|p| p.name == 9 && p.meta == b"role=server")
    })
    .await;
    late.shutdown().await;
    wait_for("departed peer leaves the topology", || {
        net.meshes
            .iter()
            .all(|m| !m.peers().iter().any(|p| p.name == 9))
    })
    .await;
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unicast_errors() {
    let net = start_net(1, &[vec![]], |c| c.max_frame = 1000).await;
    assert_eq!(
        net.channels[0].send_unicast(77, vec![1]),
        Err(MeshError::Unreachable(77))
    );
    assert_eq!(
        net.channels[0].send_unicast(77, vec![0; 1001]),
        Err(MeshError::TooLarge(1001, 1000))
    );
    net.shutdown().await;
}

/// Captures log lines of the current thread (the tests below use a current-thread
/// runtime so every mesh task logs here).
#[derive(Clone, Default)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);
impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
impl LogBuf {
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        let me = self.clone();
        let sub = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || me.clone())
            .finish();
        tracing::subscriber::set_default(sub)
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).to_string()
    }
}

#[tokio::test(flavor = "current_thread")]
async fn passwords_must_match_on_both_sides() {
    let logs = LogBuf::default();
    let _guard = logs.install();
    let (la, a) = bind().await;
    let mut ca = fast_config(1, &a);
    ca.key = Some(key("sesame"));
    let ma = Mesh::start(ca, la);
    let ra = Arc::new(Recorder::default());
    let cha = ma.register("test", ra.clone());

    // Wrong password, and no password at all: both refused, on both sides.
    for (name, pw) in [(2u64, Some(key("wrong"))), (3, None)] {
        let (l, addr) = bind().await;
        let mut c = fast_config(name, &addr);
        c.seeds = vec![a.clone()];
        c.key = pw;
        let m = Mesh::start(c, l);
        wait_for("both sides refuse", || m.stats().handshakes_refused >= 2).await;
        let refused_to =
            format!("refused connection to {a}: authentication failed (wrong or missing mesh key)");
        wait_for("log lines name the remote address", || {
            let t = logs.text();
            t.contains(&refused_to)
                && t.contains("WARN")
                && t.contains("refused connection from 127.0.0.1:")
        })
        .await;
        assert_eq!(m.stats().connections, 0);
        assert_eq!(m.peers().len(), 1, "no topology crossed");
        assert_eq!(
            cha.send_unicast(name, b"x".to_vec()),
            Err(MeshError::Unreachable(name))
        );
        m.shutdown().await;
    }
    assert!(ma.stats().handshakes_refused >= 2);
    assert_eq!(ma.peers().len(), 1);

    // A node without password refuses a node with one, too.
    let (lp, p) = bind().await;
    let plain = Mesh::start(fast_config(4, &p), lp);
    let (l5, a5) = bind().await;
    let mut c5 = fast_config(5, &a5);
    c5.key = Some(key("sesame"));
    c5.seeds = vec![p.clone()];
    let m5 = Mesh::start(c5, l5);
    wait_for("plain node refuses an encrypted one", || {
        plain.stats().handshakes_refused >= 1 && m5.stats().handshakes_refused >= 1
    })
    .await;
    assert_eq!(plain.peers().len(), 1);
    plain.shutdown().await;
    m5.shutdown().await;

    // The right password connects, and data flows encrypted (both directions, big frames).
    let (lb, b) = bind().await;
    let mut cb = fast_config(6, &b);
    cb.key = Some(key("sesame"));
    cb.seeds = vec![a.clone()];
    let mb = Mesh::start(cb, lb);
    let rb = Arc::new(Recorder::default());
    let chb = mb.register("test", rb.clone());
    wait_for("encrypted pair connects", || {
        ma.peers().iter().any(|p| p.name == 6 && p.reachable)
    })
    .await;
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    cha.send_unicast(6, big.clone()).unwrap();
    chb.send_unicast(1, b"back".to_vec()).unwrap();
    wait_for("encrypted unicasts arrive", || {
        rb.got_unicast(&big) && ra.got_unicast(b"back")
    })
    .await;
    mb.shutdown().await;
    ma.shutdown().await;
}

/// A fake peer that completes a plaintext handshake with `addr`.
async fn raw_handshake(addr: &str, name: PeerName) -> TcpStream {
    use mesh_core::proto::meshpb::MeshHandshake;
    use prost::Message;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let hs = MeshHandshake {
        protocol: "meshd-mesh".into(),
        min_version: mesh_core::mesh::wire::MIN_VERSION,
        max_version: mesh_core::mesh::wire::MAX_VERSION,
        name,
        nickname: "raw".into(),
        uid: 1,
        address: String::new(),
        encrypted: false,
    }
    .encode_to_vec();
    s.write_all(&(hs.len() as u32).to_be_bytes()).await.unwrap();
    s.write_all(&hs).await.unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.unwrap();
    let mut theirs = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut theirs).await.unwrap();
    mesh_core::mesh::decode_handshake(&theirs).unwrap();
    s
}

/// Reads until the peer closes; panics at the deadline.
async fn closed_by_peer(s: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    let res = tokio::time::timeout(DEADLINE, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(res.is_ok(), "connection was not closed");
}

#[tokio::test(flavor = "current_thread")]
async fn garbage_and_oversized_frames_close_only_their_connection() {
    let logs = LogBuf::default();
    let _guard = logs.install();
    let edges = vec![vec![], vec![0]];
    let net = start_net(2, &edges, |c| c.max_frame = 64 * 1024).await;
    wait_for("pair connected", || {
        net.converged(&|a, b| a.abs_diff(b) as u32)
    })
    .await;
    let addr = net.addrs[0].clone();

    // Random bytes instead of a handshake.
    let mut g = TcpStream::connect(&addr).await.unwrap();
    let junk: Vec<u8> = (0..10_000).map(|i| (i * 7 + 3) as u8).collect();
    let _ = g.write_all(&junk).await;
    closed_by_peer(&mut g).await;

    // A valid handshake, then a frame over the limit.
    let mut s = raw_handshake(&addr, 99).await;
    s.write_all(&(64 * 1024 + 2048u32).to_be_bytes())
        .await
        .unwrap();
    closed_by_peer(&mut s).await;
    wait_for("oversized frame counted", || {
        net.meshes[0].stats().frames_rejected == 1
    })
    .await;

    // A valid handshake, then an undecodable frame.
    let mut u = raw_handshake(&addr, 98).await;
    u.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).await.unwrap();
    closed_by_peer(&mut u).await;
    wait_for("undecodable frame counted", || {
        net.meshes[0].stats().frames_rejected == 2
    })
    .await;
    assert!(
        logs.text().contains("exceeds the limit"),
        "oversized frame logged"
    );

    // The real peer never noticed.
    assert_eq!(net.meshes[0].stats().connections, 1);
    net.unicast_and_broadcast(1, 0).await;
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_flood_is_rate_limited_and_peers_keep_working() {
    let edges = vec![vec![], vec![0]];
    let net = start_net(2, &edges, |c| {
        c.accept_per_sec = 10;
        c.dead_after = Duration::from_millis(1000);
    })
    .await;
    wait_for("pair connected", || {
        net.converged(&|a, b| a.abs_diff(b) as u32)
    })
    .await;
    let mut flood = Vec::new();
    for _ in 0..300 {
        if let Ok(s) = TcpStream::connect(&net.addrs[0]).await {
            flood.push(s);
        }
    }
    // Most of the burst is refused at accept; the established peer keeps working,
    // during the flood and after its sockets time out.
    wait_for("burst refused by the bucket", || {
        net.meshes[0].stats().handshakes_refused >= 250
    })
    .await;
    net.unicast_and_broadcast(0, 1).await;
    assert_eq!(net.meshes[0].stats().connections, 1);
    drop(flood);
    net.unicast_and_broadcast(1, 0).await;
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_is_enforced() {
    // Peer 0 takes at most 2 connections; peers 1..=3 all seed it.
    let edges = vec![vec![], vec![0], vec![0], vec![0]];
    let net = start_net(4, &edges, |c| {
        if c.name == 1 {
            c.max_connections = 2;
        }
    })
    .await;
    wait_for("two peers admitted", || {
        net.meshes[0].stats().connections == 2
    })
    .await;
    wait_for("the third is refused and retries", || {
        net.meshes[1..]
            .iter()
            .filter(|m| m.stats().connections == 0)
            .count()
            == 1
    })
    .await;
    assert_eq!(net.meshes[0].stats().connections, 2);
    net.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_peer_is_a_new_incarnation() {
    // A long gossip interval keeps the old entry from being collected before the
    // restart, so the new incarnation must win over it in the CRDT order (version,
    // then uid): a higher uid at the same version, or a higher version.
    let slow_gc = |c: &mut MeshConfig| c.gossip_interval = Duration::from_secs(30);
    let net = start_net(2, &[vec![], vec![0]], slow_gc).await;
    wait_for("pair connected", || {
        net.converged(&|a, b| a.abs_diff(b) as u32)
    })
    .await;
    let old = net.meshes[1]
        .peers()
        .into_iter()
        .find(|p| p.is_self)
        .unwrap();
    net.meshes[1].shutdown().await;

    let (l, addr) = bind().await;
    let mut cfg = fast_config(2, &addr);
    slow_gc(&mut cfg);
    cfg.seeds = vec![net.addrs[0].clone()];
    let reborn = Mesh::start(cfg, l);
    assert_ne!(reborn.uid(), old.uid);
    wait_for("the new incarnation replaces the old entry", || {
        net.meshes[0].peers().iter().any(|p| {
            p.name == 2
                && p.uid == reborn.uid()
                && p.reachable
                && p.address == addr
                && (p.version, p.uid) > (old.version, old.uid)
        })
    })
    .await;
    reborn.shutdown().await;
    net.meshes[0].shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_frame_that_keeps_moving_is_not_a_dead_peer() {
    use mesh_core::proto::meshpb::{mesh_frame, MeshChannelMessage, MeshFrame};
    use prost::Message;
    let net = start_net(1, &[vec![]], |c| c.dead_after = Duration::from_millis(600)).await;
    let mut s = raw_handshake(&net.addrs[0], 99).await;
    let frame = MeshFrame {
        body: Some(mesh_frame::Body::Channel(MeshChannelMessage {
            channel: "test".into(),
            kind: 1,
            src: 99,
            dst: 1,
            ttl: 8,
            payload: b"slowly".to_vec(),
        })),
    }
    .encode_to_vec();
    let mut record = (frame.len() as u32).to_be_bytes().to_vec();
    record.extend_from_slice(&frame);
    // The whole frame takes about 3 × dead_after, each piece well within it.
    let pieces: Vec<&[u8]> = record.chunks(record.len().div_ceil(9)).collect();
    for piece in pieces {
        s.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_for("slow frame delivered", || {
        net.recorders[0].got_unicast(b"slowly")
    })
    .await;
    net.shutdown().await;
}

/// Once the topology has converged, anti-entropy costs a summary per round (about a
/// dozen bytes), not a digest that grows with the mesh (here 20 items, over 400 bytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converged_mesh_exchanges_summaries_not_digests() {
    let n = 20;
    let mut listeners = Vec::new();
    let mut addrs = Vec::new();
    for _ in 0..n {
        let (l, a) = bind().await;
        listeners.push(l);
        addrs.push(a);
    }
    let meshes: Vec<Arc<Mesh>> = listeners
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            let mut cfg = fast_config(i as u64 + 1, &addrs[i]);
            cfg.seeds = vec![addrs[(i + 1) % n].clone()];
            Mesh::start(cfg, l)
        })
        .collect();
    wait_for("ring converges", || {
        meshes
            .iter()
            .all(|m| m.peers().iter().filter(|p| p.reachable).count() == n)
    })
    .await;
    // Let the last versions settle, then count what a quiet stretch of rounds costs.
    let interval = meshes[0].config().gossip_interval;
    let sent = |ms: &[Arc<Mesh>]| -> u64 { ms.iter().map(|m| m.stats().gossip_bytes_out).sum() };
    let mut quiet_rounds = 0;
    for _ in 0..200 {
        let versions: Vec<u64> = meshes.iter().map(|m| own_version(m)).collect();
        let before = sent(&meshes);
        tokio::time::sleep(interval * 20).await;
        let after = sent(&meshes);
        let unchanged = meshes
            .iter()
            .zip(&versions)
            .all(|(m, &v)| own_version(m) == v);
        if unchanged {
            let per_peer_round = (after - before) as f64 / n as f64 / 20.0;
            assert!(
                per_peer_round < 64.0,
                "a quiet round cost {per_peer_round:.0} bytes per peer"
            );
            quiet_rounds += 1;
            if quiet_rounds == 3 {
                break;
            }
        }
    }
    assert_eq!(
        quiet_rounds, 3,
        "the topology never stayed unchanged for 20 rounds"
    );
    for m in &meshes {
        m.shutdown().await;
    }
}

fn own_version(m: &Mesh) -> u64 {
    m.peers()
        .into_iter()
        .find(|p| p.is_self)
        .map(|p| p.version)
        .unwrap_or(0)
}

async fn write_rec(s: &mut TcpStream, payload: &[u8]) {
    s.write_all(&(payload.len() as u32).to_be_bytes())
        .await
        .unwrap();
    s.write_all(payload).await.unwrap();
}

async fn read_rec(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await?;
    let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).await?;
    Ok(buf)
}

fn encrypted_hello(name: PeerName, uid: u64) -> Vec<u8> {
    use mesh_core::proto::meshpb::MeshHandshake;
    use prost::Message;
    MeshHandshake {
        protocol: mesh_core::mesh::wire::PROTOCOL.into(),
        min_version: mesh_core::mesh::wire::MIN_VERSION,
        max_version: mesh_core::mesh::wire::MAX_VERSION,
        name,
        nickname: "fake".into(),
        uid,
        address: String::new(),
        encrypted: true,
    }
    .encode_to_vec()
}

/// A fake peer holding the key dials `addr` as (`name`, `uid`) and completes the
/// encrypted handshake with its confirmation. Returns the socket, its transport
/// state, and the two records it sent before the key exchange finished (to replay).
async fn encrypted_dial(
    addr: &str,
    k: &MeshKey,
    name: PeerName,
    uid: u64,
) -> (TcpStream, snow::StatelessTransportState, [Vec<u8>; 2]) {
    use mesh_core::mesh::wire;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let hello = encrypted_hello(name, uid);
    write_rec(&mut s, &hello).await;
    let theirs = read_rec(&mut s).await.unwrap();
    let mut prologue = wire::with_length_prefix(&hello);
    prologue.extend_from_slice(&wire::with_length_prefix(&theirs));
    let mut hs = snow::Builder::new(wire::NOISE_PARAMS.parse().unwrap())
        .psk(0, k.bytes())
        .unwrap()
        .prologue(&prologue)
        .unwrap()
        .build_initiator()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = hs.write_message(&[], &mut buf).unwrap();
    let first = buf[..n].to_vec();
    write_rec(&mut s, &first).await;
    let reply = read_rec(&mut s).await.unwrap();
    hs.read_message(&reply, &mut buf).unwrap();
    let cipher = hs.into_stateless_transport_mode().unwrap();
    let mut nonce = 0;
    let confirm = wire::seal(&cipher, &mut nonce, wire::CONFIRM).unwrap();
    write_rec(&mut s, &confirm).await;
    (s, cipher, [hello, first])
}

/// A captured handshake replayed later (after its peer came back under a new uid) is
/// answered, but never registered: it cannot confirm, so the live connection stays.
#[tokio::test(flavor = "current_thread")]
async fn a_replayed_handshake_never_replaces_a_live_connection() {
    let (la, a) = bind().await;
    let mut ca = fast_config(1, &a);
    ca.key = Some(key("sesame"));
    // The fake peers send no heartbeats: give them time.
    ca.dead_after = Duration::from_secs(30);
    let ma = Mesh::start(ca, la);
    let k = key("sesame");

    // The first session, captured by an eavesdropper, then closed.
    let (first, _, captured) = encrypted_dial(&a, &k, 2, 5).await;
    wait_for("first session registered", || ma.stats().connections == 1).await;
    drop(first);
    wait_for("first session gone", || ma.stats().connections == 0).await;

    // The peer's live session, under a new uid.
    let (mut live, cipher, _) = encrypted_dial(&a, &k, 2, 6).await;
    wait_for("live session registered", || ma.stats().connections == 1).await;
    let refused = ma.stats().handshakes_refused;

    // The replay: the same two records; the member answers the key exchange but the
    // replayer cannot seal the confirmation.
    let mut replay = TcpStream::connect(&a).await.unwrap();
    write_rec(&mut replay, &captured[0]).await;
    read_rec(&mut replay).await.unwrap();
    write_rec(&mut replay, &captured[1]).await;
    read_rec(&mut replay).await.unwrap();
    write_rec(&mut replay, &[0u8; 34]).await;
    closed_by_peer(&mut replay).await;
    wait_for("replay refused", || ma.stats().handshakes_refused > refused).await;

    // The live session still carries the member's frames (heartbeats every 50 ms).
    assert_eq!(ma.stats().connections, 1);
    let mut nonce = 0;
    for _ in 0..20 {
        let record = tokio::time::timeout(DEADLINE, read_rec(&mut live))
            .await
            .expect("a frame from the member")
            .expect("the live connection is still open");
        mesh_core::mesh::wire::open(&cipher, &mut nonce, &record).expect("decrypts");
    }
    ma.shutdown().await;
}
