#!/usr/bin/env bash
# Big keyspaces, meshd against etcd 3.4.23 (Debian) and etcd 3.5.1 (official binaries)
# on the same machine in one run, one system at a time (alternating when ROUNDS > 1),
# each on a fresh cluster of MEMBERS members on loopback:
#
#   load     KEYS keys of VAL bytes, each written once, by bench/etcd-load (100 clients)
#   range    count-only and keys-only over every key, every value in 64 MiB pages, and
#            the 10,000 keys under one prefix (etcd-load range, linearizable)
#   snapshot etcdctl 3.5.1 snapshot save, timed, and the file's size
#   resident RSS of each member after the load (the largest), data dir size (member 0)
#   restart  every member stopped (SIGTERM) and started again: seconds until member 0
#            answers a linearizable read of the last key, and RSS then
#   catch-up (MEMBERS=3) a fourth, empty member added as a learner: seconds until it
#            serves the last key from its own state (serializable read), its RSS then
#
#   bench/datascale.sh                              # 1M keys of 256 B, one member
#   KEYS=5000000 MEMBERS=3 bench/datascale.sh
#   KEYS=100000 VAL=102400 bench/datascale.sh       # 100k values of 100 KiB (~10 GB)
#   SYSTEMS="meshd etcd-3.5.1" ROUNDS=2 BUILD=0 bench/datascale.sh
#   MESHD=/tmp/old/meshd SYSTEMS=meshd BUILD=0 bench/datascale.sh   # another build
#   SNAPSHOT_COUNT=10000 ...        # --snapshot-count for every system (meshd's default;
#                                   # etcd's 100,000 entries of 100 KiB do not fit in memory)
#
# Needs about KEYS * VAL * MEMBERS * 2 bytes of free disk for the largest system; each
# system's data dirs are deleted before the next one starts.
set -euo pipefail
cd "$(dirname "$0")/.."
KEYS=${KEYS:-1000000}
VAL=${VAL:-256}
MEMBERS=${MEMBERS:-1}
ROUNDS=${ROUNDS:-1}
SYSTEMS=${SYSTEMS:-"meshd etcd-3.4.23 etcd-3.5.1"}
BUILD=${BUILD:-1}
case "$MEMBERS" in 1 | 3) ;; *) echo "MEMBERS is 1 or 3" >&2; exit 2 ;; esac
command -v etcd >/dev/null || { echo "needs etcd: apt-get install etcd-server" >&2; exit 1; }
[ "$BUILD" = 0 ] || cargo build --release -q -p meshd -p meshctl -p etcd-load
MESHD=${MESHD:-target/release/meshd}
source scripts/lib/cluster.sh
source bench/members.sh
LOAD=target/release/etcd-load
ETCDCTL="$E351/etcdctl"
# Room for the largest load on every system (etcd's default quota is 2 GiB).
FLAGS=(--quota-backend-bytes $((64 * 1024 * 1024 * 1024)))
# Both systems name it alike; etcd keeps every entry since its last snapshot in memory.
[ -n "${SNAPSHOT_COUNT:-}" ] && FLAGS+=(--snapshot-count "$SNAPSHOT_COUNT")
last_key=$(printf '%08d' $((KEYS - 1)))

now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc; }
rss_mib() { echo $(($(awk '/VmRSS/ {print $2}' "/proc/$1/status") / 1024)); }
ctl() { ETCDCTL_API=3 "$ETCDCTL" --command-timeout=600s "$@"; }

until_ok() { # TIMEOUT-SECS COMMAND...: run COMMAND until it succeeds
  local end=$(($(date +%s) + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || { echo "timed out: $*" >&2; tail -n 20 "$work"/*.log >&2; return 1; }
    sleep 0.05
  done
}

results="$work/results"
printf 'datascale: %s keys of %s B, %s member(s), %s round(s)\n' "$KEYS" "$VAL" "$MEMBERS" "$ROUNDS"
for round in $(seq 1 "$ROUNDS"); do
  for sys in $SYSTEMS; do
    mpid=()
    for i in 0 1 2 3; do cport[$i]=$(free_port); pport[$i]=$(free_port); done
    init=$(initial "$sys" "$MEMBERS")
    # One meshd on its own takes no cluster flags.
    [ "$sys" = meshd ] && [ "$MEMBERS" = 1 ] && init=""
    for ((i = 0; i < MEMBERS; i++)); do start_member "$sys" "$i" "$init" new "${FLAGS[@]}"; done
    eps=$(for ((i = 0; i < MEMBERS; i++)); do printf '127.0.0.1:%s,' "${cport[$i]}"; done)
    eps=${eps%,}
    ep0=127.0.0.1:${cport[0]}
    until_ok 120 ctl --endpoints "$eps" endpoint health --cluster
    row="$sys round $round"

    # Load: every key once, 100 clients over 10 (1 member) or 12 connections.
    conns=10; [ "$MEMBERS" = 3 ] && conns=12
    $LOAD --endpoints "$eps" put --clients 100 --conns "$conns" --total "$KEYS" \
      --key-space-size "$KEYS" --val-size "$VAL" --sequential-keys >"$work/load.json"
    [ "$(json 'd["errors"]' <"$work/load.json")" = 0 ] || { cat "$work/load.json"; exit 1; }
    row+=" load_s=$(json '"%.1f" % d["elapsed_secs"]' <"$work/load.json")"
    row+=" load_rps=$(json '"%.0f" % d["throughput_rps"]' <"$work/load.json")"
    # Every member has applied the last key before anything is measured.
    for ((i = 0; i < MEMBERS; i++)); do
      until_ok 600 sh -c "[ -n \"\$(ETCDCTL_API=3 '$ETCDCTL' --endpoints 127.0.0.1:${cport[$i]} get $last_key --consistency=s --print-value-only)\" ]"
    done
    rss=0
    for ((i = 0; i < MEMBERS; i++)); do r=$(rss_mib "${mpid[$i]}"); [ "$r" -gt "$rss" ] && rss=$r; done
    row+=" rss_mib=$rss disk_mib=$(du -sm "$work/$sys-m0" | cut -f1)"

    $LOAD --endpoints "$ep0" range >"$work/range.json"
    row+=" $(json '"count_only_s=%.2f keys_only_s=%.2f full_s=%.2f prefix_10k_s=%.3f" % (d["count_only_secs"], d["keys_only_secs"], d["full_secs"], d["prefix_secs"])' <"$work/range.json")"
    [ "$(json 'd["count"]' <"$work/range.json")" = "$KEYS" ] || { echo "count mismatch: $(cat "$work/range.json")" >&2; exit 1; }

    t=$(now)
    ctl --endpoints "$ep0" snapshot save "$work/snap.db" >"$work/snap.log" 2>&1 || { cat "$work/snap.log"; exit 1; }
    row+=" snapshot_s=$(printf '%.2f' "$(since "$t")") snapshot_mib=$(($(stat -c %s "$work/snap.db") / 1048576))"
    rm -f "$work/snap.db"

    # Restart: all members down, all up, until member 0 answers a linearizable read.
    stop_members
    t=$(now)
    for ((i = 0; i < MEMBERS; i++)); do start_member "$sys" "$i" "$init" new "${FLAGS[@]}"; done
    until_ok 600 ctl --endpoints "$ep0" get "$last_key" --print-value-only
    row+=" restart_s=$(printf '%.2f' "$(since "$t")") restart_rss_mib=$(rss_mib "${mpid[0]}")"

    if [ "$MEMBERS" = 3 ]; then
      # A fourth member, empty, added as a learner; it catches up from a snapshot.
      # (meshd takes the peer URL's host:port as the new member's mesh address.) etcd
      # refuses changes for 5 s after a restart ("unhealthy cluster"): retry.
      rev=$(ctl --endpoints "$ep0" endpoint status -w json | json 'd[0]["Status"]["header"]["revision"]')
      until_ok 60 ctl --endpoints "$eps" member add m3 --peer-urls "http://127.0.0.1:${pport[3]}" --learner
      id=$(ctl --endpoints "$eps" member list | awk -F', ' '$3 == "m3" || $4 == "http://127.0.0.1:'"${pport[3]}"'" {print $1}')
      t=$(now)
      start_member "$sys" 3 "$(initial "$sys" 4)" existing "${FLAGS[@]}"
      # Caught up: the new member itself (a meshd node forwards calls until it is a
      # member) reports the revision of the load.
      until_ok 1200 sh -c "ETCDCTL_API=3 '$ETCDCTL' --endpoints 127.0.0.1:${cport[3]} endpoint status -w json | python3 -c '
import json, sys
h = json.load(sys.stdin)[0][\"Status\"][\"header\"]
sys.exit(not (h[\"member_id\"] == int(\"$id\", 16) and h[\"revision\"] >= $rev))'"
      row+=" catchup_s=$(printf '%.2f' "$(since "$t")") catchup_rss_mib=$(rss_mib "${mpid[3]}")"
    fi
    stop_members
    rm -rf "$work/$sys"-m*
    echo "$row" | tee -a "$results"
  done
done
