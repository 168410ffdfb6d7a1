#!/usr/bin/env bash
# Side-by-side: three-member clusters of etcd 3.4.23 (Debian etcd-server), etcd 3.5.1
# (the official binaries, `scripts/etcd-3.5.1`) and meshd on loopback on this machine,
# the same `meshctl bench` workloads against each, in one run, alternating, ROUNDS times. Prints one line per run, a summary table, CPU seconds and
# peak RSS of the servers. (Failover time: bench/failover.sh.)
#
#   bench/compare.sh                 # defaults below
#   ROUNDS=3 TOTAL=20000 bench/compare.sh
#   ONLY='put-1client put-100clients' bench/compare.sh   # a subset of the workloads
#   BUILD=0 bench/compare.sh         # skip the release build
#   RATE=4000 bench/compare.sh       # the fixed load of put-100clients-at-rate
#   ETCD35=0 bench/compare.sh        # without etcd 3.5.1 (no download)
#   CLIENT=etcd-load bench/compare.sh  # the put workloads through bench/etcd-load, a client
#                                      # built only on the etcd-client crate, not meshctl
#   LEASES=100000 EXPIRING=10000 bench/compare.sh  # the lease storm's size
#
# lease-storm and watch-10k-watchers always run through bench/etcd-load (meshctl bench
# has no such workload): the first grants LEASES leases, each on a key, EXPIRING of them
# expiring within one second while 100 clients put, and reports put latency during the
# expiry (the table) and before it, and how long until the expired keys were gone; the
# second puts with 100 clients while 10,000 watchers on 1,000 keys (10 per key, over 100
# watch streams) receive every event, and reports the events delivered and their
# delivery latency. Those details are printed after the table.
#
# Multi-connection workloads spread their connections over all three members (connection
# i to member i mod 3, as etcd's benchmark does; 12 connections, so each member gets as
# many clients whichever leads). Single-connection workloads go to each system's current
# Raft leader, or to a follower where the label says so (asked with `endpoint status`
# before every run), so both systems' single clients take the same path.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-2}
TOTAL=${TOTAL:-20000}   # requests per 100-client run: about 2 s of puts, so one stall of the host does not decide a median
TOTAL1=${TOTAL1:-2000}
WTOTAL=${WTOTAL:-400}   # puts in the watch fan-out, each delivered to 1000 watchers: 400000 deliveries, 2-4 s
VAL=${VAL:-256}
CONNS=${CONNS:-12}   # connections of the 100-client workloads: a multiple of the 3 members
ONLY=${ONLY:-}
RATE=${RATE:-4000}   # req/s of put-100clients-at-rate: below both systems' most, so p99 compares at equal load
BUILD=${BUILD:-1}   # BUILD=0: use the binaries already in target/release
ETCD35=${ETCD35:-1}  # ETCD35=0: only Debian's etcd 3.4 as the anchor
CLIENT=${CLIENT:-meshctl}  # or etcd-load (put workloads only)
command -v etcd >/dev/null || { echo "needs etcd: apt-get install etcd-server" >&2; exit 1; }
[ "$BUILD" = 0 ] || cargo build --release --bins -q
[ "$BUILD" = 0 ] || cargo build --release -p etcd-load -q
LEASES=${LEASES:-100000}
EXPIRING=${EXPIRING:-10000}
ETCDLOAD=target/release/etcd-load
MESHCTL=target/release/meshctl
MESHD=target/release/meshd
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  # The ports are fixed: a run started right after this one must find them free.
  for p in "${pids[@]}"; do
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  done
  rm -rf "$work"
}
trap cleanup EXIT

start_etcd() { # binary name-prefix client-port-prefix peer-port-prefix
  local bin=$1 n=$2 cp=$3 pp=$4 init="" i
  for i in 0 1 2; do init+="${init:+,}$n$i=http://127.0.0.1:${pp}${i}80"; done
  for i in 0 1 2; do
    "$bin" --name $n$i --data-dir "$work/$n$i" \
      --listen-client-urls http://127.0.0.1:${cp}${i}379 --advertise-client-urls http://127.0.0.1:${cp}${i}379 \
      --listen-peer-urls http://127.0.0.1:${pp}${i}80 --initial-advertise-peer-urls http://127.0.0.1:${pp}${i}80 \
      --initial-cluster "$init" --initial-cluster-token bench >"$work/$n$i.log" 2>&1 &
    pids+=($!); disown
  done
}
start_etcd etcd e 3 12
systems="etcd meshd"
if [ "$ETCD35" = 1 ]; then
  etcd35="$(scripts/etcd-3.5.1)/etcd"
  start_etcd "$etcd35" f 4 13
  systems="etcd etcd35 meshd"
fi
m_init=m0=127.0.0.1:16783,m1=127.0.0.1:16784,m2=127.0.0.1:16785
for i in 0 1 2; do
  $MESHD --name m$i --data-dir "$work/m$i" --listen-client 127.0.0.1:2${i}379 \
    --listen-mesh 127.0.0.1:1678$((3 + i)) --listen-metrics 127.0.0.1:2${i}381 --initial-cluster $m_init >"$work/m$i.log" 2>&1 &
  pids+=($!); disown
done
ETCD_EPS=127.0.0.1:30379,127.0.0.1:31379,127.0.0.1:32379
ETCD35_EPS=127.0.0.1:40379,127.0.0.1:41379,127.0.0.1:42379
MESHD_EPS=127.0.0.1:20379,127.0.0.1:21379,127.0.0.1:22379
all_systems_eps=$ETCD_EPS; [ "$ETCD35" = 1 ] && all_systems_eps+=" $ETCD35_EPS"
for eps in $all_systems_eps $MESHD_EPS; do
  # Nine members start at once on two cores: allow a minute.
  for _ in $(seq 300); do
    $MESHCTL --endpoints "$eps" endpoint health >/dev/null 2>&1 && break
    for p in "${pids[@]}"; do
      kill -0 "$p" 2>/dev/null && continue
      echo "a server exited while starting (a port in use?):" >&2
      tail -n 3 "$work"/*.log >&2
      exit 1
    done
    sleep 0.2
  done
  $MESHCTL --endpoints "$eps" endpoint health >/dev/null
done

cpu() { # total CPU seconds (user+sys) of the server processes of one system
  local sum=0 pat=$1
  for p in $(pgrep -f "$pat"); do
    read -r ut st < <(awk '{print $14, $15}' /proc/$p/stat)
    sum=$((sum + ut + st))
  done
  awk -v s="$sum" -v h="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f", s / h }'
}
rss() { local m=0; for p in $(pgrep -f "$1"); do r=$(awk '/VmHWM/{print $2}' /proc/$p/status); [ "$r" -gt "$m" ] && m=$r; done; echo "$((m / 1024))MiB"; }

printf '%-6s %-22s %10s %9s %9s %9s\n' system workload req/s p50_ms p99_ms max_ms
results="$work/results"
details="$work/details"
leader_of() { # eps -> the client endpoint of the member that is the Raft leader now
  $MESHCTL --endpoints "$1" -w json endpoint status 2>/dev/null | python3 -c '
import json, sys
rows = json.load(sys.stdin)
rows = rows if isinstance(rows, list) else [rows]
for r in rows:
    s = r["Status"]
    if s.get("leader") and s["leader"] == s["header"]["member_id"]:
        print(r["Endpoint"]); break
else:
    sys.exit("no member reports itself as leader")
'
}
follower_of() { # eps -> the client endpoint of a member that is not the leader
  local l; l=$(leader_of "$1")
  tr , '\n' <<<"$1" | grep -vx "$l" | head -1
}
run() { # system eps label args...   (eps LEADER / FOLLOWER: a member of $all_eps with that role now)
  local sys=$1 eps=$2 label=$3; shift 3
  local j
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $label "* ]]; then return; fi
  [ "$eps" = LEADER ] && eps=$(leader_of "$all_eps")
  [ "$eps" = FOLLOWER ] && eps=$(follower_of "$all_eps")
  if [ "$label" = lease-storm ] || [ "$label" = watch-10k-watchers ]; then
    if ! j=$($ETCDLOAD --endpoints "$eps" "$@"); then
      echo "# $sys $label: etcd-load failed (its error above)" >&2
      return 0
    fi
  elif [ "$CLIENT" = etcd-load ]; then
    # Plain puts only: etcd-load has no rate limit, sequential keys, reads or leases.
    [ "$1" = put ] || return 0
    case " $* " in *" --rate "*|*" --sequential-keys "*) return 0 ;; esac
    j=$($ETCDLOAD --endpoints "$eps" "$@" 2>/dev/null)
  else
    j=$($MESHCTL --endpoints "$eps" -w json bench "$@" 2>/dev/null)
  fi
  python3 - "$sys" "$label" "$j" "$details" >>"$results" <<'PY'
import json, sys
sysname, label, j = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
l = j["latency_ms"]
if j["errors"]:
    print(f"# {sysname} {label}: {j['errors']} errors, first: {j['first_error']}", file=sys.stderr)
print(f"{sysname} {label} {j['throughput_rps']} {l['p50']} {l['p99']} {l['max']}")
detail = None
if j.get("operation") == "lease-storm":
    b, d = j["before_ms"], j["during_ms"]
    gone = j["expired_keys_gone_after_secs"]
    gone = "never (timed out)" if gone is None else f"{gone:.2f} s"
    detail = (f"{sysname} lease-storm: {j['leases']} leases granted and attached in "
              f"{j['setup_secs']:.1f} s; put p99 before {b['p99']:.2f} ms, during {d['p99']:.2f} ms "
              f"(max {b['max']:.1f} / {d['max']:.1f} ms); {j['expiring']} expired keys gone after {gone}")
elif "events_delivered" in j:
    d = j["delivery_ms"]
    detail = (f"{sysname} watch-10k-watchers: {j['events_delivered']} of {j['events_expected']} "
              f"events delivered, delivery p50 {d['p50']:.2f} ms p99 {d['p99']:.2f} ms max {d['max']:.1f} ms"
              + (f"; watch error: {j['watch_error']}" if j.get("watch_error") else ""))
if detail:
    with open(sys.argv[4], "a") as f:
        print(detail, file=f)
PY
  tail -1 "$results" | awk '{printf "%-6s %-22s %10.0f %9.2f %9.2f %9.2f\n", $1, $2, $3, $4, $5, $6}'
}
for r in $(seq "$ROUNDS"); do
  for sys in $systems; do
    case $sys in etcd) eps=$ETCD_EPS ;; etcd35) eps=$ETCD35_EPS ;; meshd) eps=$MESHD_EPS ;; esac
    all_eps=$eps leader=LEADER
    run $sys "$leader" put-1client put --clients 1 --conns 1 --total "$TOTAL1" --val-size "$VAL" --key-space-size 100000
    run $sys "$eps" put-100clients put --clients 100 --conns "$CONNS" --total "$TOTAL" --val-size "$VAL" --key-space-size 100000
    run $sys "$eps" put-100clients-at-rate put --clients 100 --conns "$CONNS" --total "$TOTAL" --val-size "$VAL" --key-space-size 100000 --rate "$RATE"
    run $sys "$eps" put-seq-100clients put --clients 100 --conns "$CONNS" --total "$TOTAL" --val-size "$VAL" --key-space-size 100000 --sequential-keys
    run $sys "$eps" txn-put-100clients txn-put --clients 100 --conns "$CONNS" --total "$TOTAL" --val-size "$VAL" --key-space-size 100000
    run $sys "$eps" get-l-100clients get --clients 100 --conns "$CONNS" --total "$TOTAL" --consistency l
    run $sys "$eps" get-s-100clients get --clients 100 --conns "$CONNS" --total "$TOTAL" --consistency s
    run $sys "$leader" get-l-1client get --clients 1 --conns 1 --total "$TOTAL1" --consistency l
    run $sys FOLLOWER get-l-1client-follower get --clients 1 --conns 1 --total "$TOTAL1" --consistency l
    run $sys "$eps" lease-keepalive-100 lease-keepalive --clients 100 --conns "$CONNS" --total "$TOTAL"
    run $sys "$leader" watch-1000watchers watch --watchers 1000 --conns 10 --total "$WTOTAL"
    run $sys "$eps" watch-10k-watchers watch --clients 100 --conns "$CONNS" --watchers 10000 --keys 1000 --watch-streams 100 --total "$TOTAL" --val-size "$VAL"
    run $sys "$eps" lease-storm lease-storm --clients 100 --conns "$CONNS" --leases "$LEASES" --expiring "$EXPIRING" --val-size "$VAL"
  done
done
echo
echo "CPU seconds (servers, whole run): etcd $(cpu 'etcd --name e') meshd $(cpu 'meshd --name m')$([ "$ETCD35" = 1 ] && echo " etcd35 $(cpu 'etcd --name f')")"
echo "peak RSS (largest member): etcd $(rss 'etcd --name e') meshd $(rss 'meshd --name m')$([ "$ETCD35" = 1 ] && echo " etcd35 $(rss 'etcd --name f')")"
if [ -s "$details" ]; then echo; cat "$details"; fi
echo
echo "median over rounds (req/s, p99 ms), ratio meshd/etcd (3.4, and 3.5.1 as etcd35):"
python3 - "$results" <<'PY'
import sys, statistics, collections
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    s, w, rate, p50, p99, mx = line.split()
    rows[(s, w)].append((float(rate), float(p99)))
for w in sorted({w for _, w in rows}):
    m = rows[("meshd", w)]
    if not m:
        continue
    mr = statistics.median(r for r, _ in m); mp = statistics.median(p for _, p in m)
    line = f"{w:22s} meshd {mr:8.0f}/s p99 {mp:7.2f}ms"
    for anchor in ("etcd", "etcd35"):
        e = rows[(anchor, w)]
        if not e:
            continue
        er = statistics.median(r for r, _ in e); ep = statistics.median(p for _, p in e)
        line += f"   {anchor} {er:8.0f}/s p99 {ep:7.2f}ms x{mr/er:4.2f}"
    print(line)
PY
