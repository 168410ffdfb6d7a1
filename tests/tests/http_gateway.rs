//! The client port's HTTP side, driven with curl as an operator or a script would:
//! `/version`, `/health`, `/livez`, `/readyz`, `/metrics` and etcd's JSON gateway
//! under `/v3/` (unary calls, streamed watch, keep-alive and snapshot, auth tokens in
//! the Authorization header, etcd's error bodies), on the same port as gRPC, in
//! plaintext and under TLS with client certificates.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use base64::Engine;
use mesh_tests::*;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn unb64(v: &Value) -> String {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(v.as_str().unwrap_or_else(|| panic!("base64 string: {v}")))
        .unwrap();
    String::from_utf8(raw).unwrap()
}

/// Runs curl; its HTTP status and body.
async fn curl(args: &[&str]) -> (u16, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "20", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .await
        .expect("curl runs (scripts/test installs it)");
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    let code = code.trim().parse().unwrap_or_else(|_| {
        panic!(
            "curl {args:?}: {text} / {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (code, body.to_string())
}

/// POSTs `body` to a gateway path; status and parsed JSON.
async fn post(base: &str, path: &str, body: Value, token: Option<&str>) -> (u16, Value) {
    let url = format!("{base}{path}");
    let data = body.to_string();
    let auth = token.map(|t| format!("Authorization: {t}"));
    let mut args = vec!["-X", "POST", url.as_str(), "-d", data.as_str()];
    if let Some(a) = &auth {
        args.extend(["-H", a.as_str()]);
    }
    let (code, text) = curl(&args).await;
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text:?}"));
    (code, v)
}

/// Adds `root` (password `rootpw`) with the root role and turns auth on, through the
/// gateway.
async fn enable_root_auth(base: &str) {
    for (path, body) in [
        (
            "/v3/auth/user/add",
            json!({"name": "root", "password": "rootpw"}),
        ),
        (
            "/v3/auth/user/grant",
            json!({"user": "root", "role": "root"}),
        ),
        ("/v3/auth/enable", json!({})),
    ] {
        let (code, v) = post(base, path, body, None).await;
        assert_eq!(code, 200, "{path}: {v}");
    }
}

async fn single_member() -> (InProcessCluster, SocketAddr, String) {
    let c = InProcessCluster::start(1, ClusterOpts::default()).await;
    let addr = c.addr(0);
    wait_for_leader(&[addr]).await;
    (c, addr, format!("http://{addr}"))
}

#[tokio::test]
async fn operator_endpoints_answer_on_the_client_port() {
    let (_c, addr, base) = single_member().await;
    let (code, body) = curl(&[&format!("{base}/version")]).await;
    assert_eq!(code, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(v["etcdserver"].as_str().unwrap().starts_with("3."), "{v}");
    assert!(v["etcdcluster"].as_str().unwrap().starts_with("3."), "{v}");

    for path in [
        "/health",
        "/health?serializable=true",
        "/health?exclude=NOSPACE",
    ] {
        let (code, body) = curl(&[&format!("{base}{path}")]).await;
        assert_eq!(code, 200, "{path}: {body}");
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap()["health"],
            "true"
        );
    }
    for path in ["/livez", "/readyz"] {
        assert_eq!(curl(&[&format!("{base}{path}")]).await, (200, "ok".into()));
    }
    let (code, page) = curl(&[&format!("{base}/metrics")]).await;
    assert_eq!(code, 200);
    assert!(page.contains("\netcd_server_has_leader 1\n"), "{page}");
    let (code, _) = curl(&[&format!("{base}/nothing-here")]).await;
    assert_eq!(code, 404);
    let (code, _) = curl(&["-X", "POST", &format!("{base}/health")]).await;
    assert_eq!(code, 405);

    // gRPC on the same port, unchanged.
    let mut client = etcd_client(addr).await;
    client.put("grpc", "still", None).await.unwrap();
    let (code, v) = post(&base, "/v3/kv/range", json!({"key": b64("grpc")}), None).await;
    assert_eq!(code, 200);
    assert_eq!(unb64(&v["kvs"][0]["value"]), "still");
}

#[tokio::test]
async fn kv_through_the_gateway_uses_etcds_json_mapping() {
    let (_c, _addr, base) = single_member().await;
    let (code, put) = post(
        &base,
        "/v3/kv/put",
        json!({"key": b64("foo"), "value": b64("bar")}),
        None,
    )
    .await;
    assert_eq!(code, 200, "{put}");
    let rev: i64 = put["header"]["revision"].as_str().unwrap().parse().unwrap();
    assert!(
        put["header"]["cluster_id"].is_string(),
        "64-bit as strings: {put}"
    );

    let (_, got) = post(&base, "/v3/kv/range", json!({"key": b64("foo")}), None).await;
    assert_eq!(got["count"], "1");
    let kv = &got["kvs"][0];
    assert_eq!(unb64(&kv["key"]), "foo");
    assert_eq!(unb64(&kv["value"]), "bar");
    assert_eq!(
        kv["mod_revision"],
        rev.to_string(),
        "field names as etcd's: {kv}"
    );
    assert_eq!(kv["create_revision"], rev.to_string());

    // A txn with enum names and a nested put; numbers may come as numbers.
    let (code, txn) = post(
        &base,
        "/v3/kv/txn",
        json!({
            "compare": [{"key": b64("foo"), "target": "VALUE", "result": "EQUAL", "value": b64("bar")}],
            "success": [{"request_put": {"key": b64("foo"), "value": b64("baz")}}],
            "failure": [{"request_range": {"key": b64("foo")}}],
        }),
        None,
    )
    .await;
    assert_eq!(code, 200, "{txn}");
    assert_eq!(txn["succeeded"], true);
    let (_, del) = post(
        &base,
        "/v3/kv/deleterange",
        json!({"key": b64("foo"), "prev_kv": true}),
        None,
    )
    .await;
    assert_eq!(del["deleted"], "1");
    assert_eq!(unb64(&del["prev_kvs"][0]["value"]), "baz");
    let (code, _) = post(&base, "/v3/kv/compaction", json!({"revision": rev}), None).await;
    assert_eq!(code, 200);

    // Errors: etcd's text and code, the HTTP status etcd's gateway gives it.
    let (code, e) = post(
        &base,
        "/v3/kv/range",
        json!({"key": b64("foo"), "revision": 1_000_000}),
        None,
    )
    .await;
    assert_eq!(code, 400);
    assert_eq!(e["code"], 11);
    assert_eq!(
        e["error"],
        "etcdserver: mvcc: required revision is a future revision"
    );
    assert_eq!(e["message"], e["error"]);
    let (code, e) = post(
        &base,
        "/v3/kv/range",
        json!({"key": b64("foo"), "revision": 1}),
        None,
    )
    .await;
    assert_eq!((code, e["code"].clone()), (400, json!(11)), "{e}");
    assert!(e["error"].as_str().unwrap().contains("compacted"), "{e}");
    let (code, e) = post(&base, "/v3/kv/put", json!({"value": b64("x")}), None).await;
    assert_eq!(code, 400);
    assert_eq!(e["error"], "etcdserver: key is not provided");

    // Member list answers peer URLs as URLs.
    let (_, members) = post(&base, "/v3/cluster/member/list", json!({}), None).await;
    let url = members["members"][0]["peerURLs"][0].as_str().unwrap();
    assert!(url.starts_with("http://"), "{members}");
    let (code, status) = post(&base, "/v3/maintenance/status", json!({}), None).await;
    assert_eq!(code, 200);
    assert!(
        status["version"].as_str().unwrap().starts_with("3."),
        "{status}"
    );
}

#[tokio::test]
async fn bad_http_input_gets_an_answer_and_the_member_keeps_serving() {
    let (_c, addr, base) = single_member().await;
    let url = format!("{base}/v3/kv/put");
    // Not JSON.
    let (code, body) = curl(&["-X", "POST", &url, "-d", "{\"key\":"]).await;
    assert_eq!(code, 400, "{body}");
    let e: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["code"], 3);
    // A wrong type for a field.
    let (code, _) = post(&base, "/v3/kv/put", json!({"key": 5}), None).await;
    assert_eq!(code, 400);
    // Unknown gateway path, wrong method.
    let (code, e) = post(&base, "/v3/kv/nothing", json!({}), None).await;
    assert_eq!((code, e["code"].clone()), (404, json!(5)));
    let (code, _) = curl(&[&url]).await;
    assert_eq!(code, 405);

    // Over the request limit: refused from its Content-Length, before the body is read.
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.json");
    let huge = "A".repeat(8 * 1024 * 1024);
    std::fs::write(&big, format!("{{\"key\":\"{huge}\"}}")).unwrap();
    let (code, body) = curl(&[
        "-X",
        "POST",
        &url,
        "--data-binary",
        &format!("@{}", big.display()),
    ])
    .await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"],
        "etcdserver: request is too large"
    );
    // The same, chunked (no Content-Length): refused once the limit is passed, with
    // etcd's text (the gRPC transport's own limit would answer differently).
    let (code, body) = curl(&[
        "-X",
        "POST",
        &url,
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        &format!("@{}", big.display()),
    ])
    .await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"],
        "etcdserver: request is too large"
    );
    // Headers announcing a huge body, and no body: the answer comes without it.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("POST /v3/kv/put HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 100000000000\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut head))
        .await
        .expect("an answer before any of the body was sent")
        .unwrap();
    let head = String::from_utf8_lossy(&head[..n]);
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");

    // Garbage that is not HTTP at all: the connection closes, nothing else happens.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"\x16\x03\x01garbage\r\n\r\n\x00\xff")
        .await
        .unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut sink)).await;

    let (code, _) = post(
        &base,
        "/v3/kv/put",
        json!({"key": b64("k"), "value": b64("v")}),
        None,
    )
    .await;
    assert_eq!(code, 200, "still serving");
}

/// A streamed gateway call read line by line (curl -N).
struct Lines {
    child: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Lines {
    fn open(url: &str, body: &str) -> Lines {
        let mut child = tokio::process::Command::new("curl")
            .args(["-sS", "-N", "-X", "POST", url, "-d", body])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Lines { child, lines }
    }

    async fn next(&mut self) -> Option<Value> {
        let line = tokio::time::timeout(Duration::from_secs(20), self.lines.next_line())
            .await
            .expect("a line within 20 s")
            .unwrap()?;
        Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}")))
    }
}

#[tokio::test]
async fn streams_watch_keepalive_and_snapshot_as_json_lines() {
    let (_c, _addr, base) = single_member().await;
    let mut watch = Lines::open(
        &format!("{base}/v3/watch"),
        &json!({"create_request": {"key": b64("w"), "prev_kv": true}}).to_string(),
    );
    let created = watch.next().await.unwrap();
    assert_eq!(created["result"]["created"], true, "{created}");
    // The watch goes on after the request body ended.
    for v in ["1", "2"] {
        post(
            &base,
            "/v3/kv/put",
            json!({"key": b64("w"), "value": b64(v)}),
            None,
        )
        .await;
    }
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let line = watch.next().await.expect("watch stays open");
        for ev in line["result"]["events"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            seen.push(unb64(&ev["kv"]["value"]));
        }
    }
    assert_eq!(seen, ["1", "2"]);
    // The client leaving ends the watch on the server: the watcher is gone.
    drop(watch);
    eventually("the watcher to go", Duration::from_secs(20), || async {
        let (_, page) = curl(&[&format!("{base}/metrics")]).await;
        page.contains("\netcd_debugging_mvcc_watcher_total 0\n")
            .then_some(())
    })
    .await;

    // Lease: grant, one keep-alive per request body (the answer ends with it), TTL.
    let (_, grant) = post(&base, "/v3/lease/grant", json!({"TTL": 60}), None).await;
    let id = grant["ID"].as_str().unwrap().to_string();
    assert_eq!(grant["TTL"], "60");
    // One keep-alive per request body: the answer is its one line, then ends.
    let (code, ka) = post(&base, "/v3/lease/keepalive", json!({"ID": id}), None).await;
    assert_eq!(code, 200);
    assert_eq!(ka["result"]["ID"], id.as_str());
    assert_eq!(ka["result"]["TTL"], "60");
    post(
        &base,
        "/v3/kv/put",
        json!({"key": b64("leased"), "value": b64("x"), "lease": id}),
        None,
    )
    .await;
    let (_, ttl) = post(
        &base,
        "/v3/lease/timetolive",
        json!({"ID": id, "keys": true}),
        None,
    )
    .await;
    assert_eq!(unb64(&ttl["keys"][0]), "leased");
    let (_, leases) = post(&base, "/v3/lease/leases", json!({}), None).await;
    assert_eq!(leases["leases"][0]["ID"], id.as_str());
    let (code, _) = post(&base, "/v3/lease/revoke", json!({"ID": id}), None).await;
    assert_eq!(code, 200);
    // Keep-alive of a lease that is gone: the stream's error line.
    // etcd answers a keep-alive of an unknown lease with its ID and no TTL.
    let (_, line) = post(&base, "/v3/lease/keepalive", json!({"ID": id}), None).await;
    assert_eq!(line["result"]["ID"], id.as_str(), "{line}");
    assert!(
        line["result"]["TTL"].is_null(),
        "a revoked lease is not kept alive: {line}"
    );

    // Snapshot: base64 blobs until remaining_bytes is zero.
    let mut snap = Lines::open(&format!("{base}/v3/maintenance/snapshot"), "{}");
    let mut total = 0;
    let mut last_remaining = None;
    while let Some(line) = snap.next().await {
        let r = &line["result"];
        assert!(r.is_object(), "{line}");
        if let Some(blob) = r["blob"].as_str() {
            total += base64::engine::general_purpose::STANDARD
                .decode(blob)
                .unwrap()
                .len();
        }
        last_remaining = Some(r["remaining_bytes"].as_str().unwrap_or("0").to_string());
    }
    assert!(total > 0);
    assert_eq!(last_remaining.as_deref(), Some("0"));
    let _ = snap.child.wait().await;
}

#[tokio::test]
async fn auth_tokens_travel_in_the_authorization_header() {
    let (_c, _addr, base) = single_member().await;
    enable_root_auth(&base).await;
    // Without a token: etcd's refusal.
    let (code, e) = post(
        &base,
        "/v3/kv/put",
        json!({"key": b64("a"), "value": b64("b")}),
        None,
    )
    .await;
    assert_ne!(code, 200, "{e}");
    assert_eq!(e["error"], "etcdserver: user name is empty");
    let (code, e) = post(
        &base,
        "/v3/auth/authenticate",
        json!({"name": "root", "password": "wrong"}),
        None,
    )
    .await;
    assert_eq!(code, 400, "{e}");
    assert_eq!(
        e["error"],
        "etcdserver: authentication failed, invalid user ID or password"
    );
    let (code, t) = post(
        &base,
        "/v3/auth/authenticate",
        json!({"name": "root", "password": "rootpw"}),
        None,
    )
    .await;
    assert_eq!(code, 200);
    let token = t["token"].as_str().unwrap();
    let (code, v) = post(
        &base,
        "/v3/kv/put",
        json!({"key": b64("a"), "value": b64("b")}),
        Some(token),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    let (code, e) = post(
        &base,
        "/v3/kv/range",
        json!({"key": b64("a")}),
        Some("bogus"),
    )
    .await;
    assert_eq!(code, 401, "{e}");
    assert_eq!(e["error"], "etcdserver: invalid auth token");
    // Lock and election through the gateway, as root.
    let (code, l) = post(
        &base,
        "/v3/lock/lock",
        json!({"name": b64("L")}),
        Some(token),
    )
    .await;
    assert_eq!(code, 200, "{l}");
    let key = l["key"].clone();
    assert!(unb64(&key).starts_with("L/"));
    let (code, _) = post(&base, "/v3/lock/unlock", json!({"key": key}), Some(token)).await;
    assert_eq!(code, 200);
    let (_, g) = post(&base, "/v3/lease/grant", json!({"TTL": 30}), Some(token)).await;
    let (code, c) = post(
        &base,
        "/v3/election/campaign",
        json!({"name": b64("E"), "lease": g["ID"], "value": b64("me")}),
        Some(token),
    )
    .await;
    assert_eq!(code, 200, "{c}");
    let (_, leader) = post(
        &base,
        "/v3/election/leader",
        json!({"name": b64("E")}),
        Some(token),
    )
    .await;
    assert_eq!(unb64(&leader["kv"]["value"]), "me");
    let (code, _) = post(
        &base,
        "/v3/election/resign",
        json!({"leader": c["leader"]}),
        Some(token),
    )
    .await;
    assert_eq!(code, 200);
}

#[tokio::test]
async fn a_follower_forwards_gateway_calls_with_the_authorization_token() {
    let c = InProcessCluster::start(3, ClusterOpts::default()).await;
    let leader = wait_for_leader(&c.live_addrs()).await;
    let follower = c.addr((c.index_of(leader) + 1) % 3);
    let base = format!("http://{follower}");
    enable_root_auth(&base).await;
    let (_, t) = post(
        &base,
        "/v3/auth/authenticate",
        json!({"name": "root", "password": "rootpw"}),
        None,
    )
    .await;
    let token = t["token"].as_str().unwrap().to_string();
    // Calls a follower hands to the leader: keep-alive, time-to-live, member list.
    let (code, grant) = post(&base, "/v3/lease/grant", json!({"TTL": 60}), Some(&token)).await;
    assert_eq!(code, 200, "{grant}");
    let id = grant["ID"].as_str().unwrap().to_string();
    let (code, ka) = post(
        &base,
        "/v3/lease/keepalive",
        json!({"ID": id}),
        Some(&token),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(ka["result"]["TTL"], "60", "{ka}");
    let (code, ttl) = post(
        &base,
        "/v3/lease/timetolive",
        json!({"ID": id}),
        Some(&token),
    )
    .await;
    assert_eq!(
        (code, ttl["grantedTTL"].clone()),
        (200, json!("60")),
        "{ttl}"
    );
    let (code, members) = post(&base, "/v3/cluster/member/list", json!({}), Some(&token)).await;
    assert_eq!(code, 200, "{members}");
    assert_eq!(members["members"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn tls_with_client_certificates_covers_both_protocols() {
    let certs = TestCerts::generate();
    let opts = ClusterOpts {
        client_tls: Some(certs.server_tls(true)),
        ..ClusterOpts::default()
    };
    let c = InProcessCluster::start(1, opts).await;
    let addr = c.addr(0);
    let base = format!("https://{addr}");
    let ca = certs.ca.display().to_string();
    let cert = certs.client_cert.display().to_string();
    let key = certs.client_key.display().to_string();
    let with_cert = |extra: &'static str, path: &str| {
        vec![
            extra.to_string(),
            "--cacert".into(),
            ca.clone(),
            "--cert".into(),
            cert.clone(),
            "--key".into(),
            key.clone(),
            format!("{base}{path}"),
        ]
    };
    let run = |args: Vec<String>| async move {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        curl(&refs).await
    };
    let probe = eventually("TLS /health", Duration::from_secs(20), || {
        let args = with_cert("--http1.1", "/health");
        async move {
            let (code, body) = run(args).await;
            (code == 200).then_some(body)
        }
    })
    .await;
    assert!(probe.contains("\"health\":\"true\""), "{probe}");
    // HTTP/2 negotiated by ALPN reaches the HTTP side too.
    let mut args = with_cert("--http2", "/version");
    args.extend([
        "-o".into(),
        "/dev/null".into(),
        // Replaces curl()'s own -w: the version, then the status where curl() reads it.
        "-w".into(),
        "%{http_version}\n%{http_code}".into(),
    ]);
    let (code, version) = run(args).await;
    assert_eq!((code, version.trim()), (200, "2"));
    // Without a client certificate the handshake fails: curl gets no HTTP status.
    let (code, _) = curl(&["--cacert", &ca, &format!("{base}/version")]).await;
    assert_eq!(code, 0, "no client certificate, no answer");
    // gRPC with the certificate still works on the same port.
    let mut client = certs.etcd_client(addr, true).await;
    client.put("over", "tls", None).await.unwrap();
}
