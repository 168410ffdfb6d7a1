#!/usr/bin/env bash
# Drives a three-member meshd cluster with etcdctl and checks every command's output
# (not just its exit status). Run by scripts/test after the binaries are built, once
# with Debian's etcdctl 3.4 (installs etcd-client when it is missing) and once with
# the official etcdctl 3.5.1 (scripts/etcd-3.5.1).
#
#   scripts/etcdctl-compat.sh            # uses target/debug/meshd and etcdctl from PATH
#   ETCDCTL="$(scripts/etcd-3.5.1)/etcdctl" scripts/etcdctl-compat.sh
#   MESHD=/path/to/meshd scripts/etcdctl-compat.sh
set -euo pipefail
cd "$(dirname "$0")/.."

ETCDCTL=${ETCDCTL:-etcdctl}
if [ "$ETCDCTL" = etcdctl ] && ! command -v etcdctl >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq etcd-client >/dev/null
fi
source scripts/lib/cluster.sh
ETCDCTL=$(command -v "$ETCDCTL")
etcdctl() { command "$ETCDCTL" "$@"; }
version=$(etcdctl version | sed -n 's/^etcdctl version: //p')
echo "etcdctl-compat: etcdctl $version against $MESHD"

failures=0
check() { # check DESCRIPTION EXPECTED ACTUAL
  if [ "$2" == "$3" ]; then
    echo "ok   $1"
  else
    echo "FAIL $1"; echo "  expected: $(printf %q "$2")"; echo "  actual:   $(printf %q "$3")"
    failures=$((failures + 1))
  fi
}
check_re() { # check_re DESCRIPTION EXTENDED-REGEX ACTUAL (whole output must match)
  if printf '%s' "$3" | tr '\n' '\001' | grep -Eq "^$(printf '%s' "$2" | tr '\n' '\001')\$"; then
    echo "ok   $1"
  else
    echo "FAIL $1"; echo "  pattern: $(printf %q "$2")"; echo "  actual:  $(printf %q "$3")"
    failures=$((failures + 1))
  fi
}

# --- a three-member cluster ---------------------------------------------------------
start_cluster 3 --listen-metrics off
EP="127.0.0.1:${clients[0]}"
export ETCDCTL_API=3
ctl() { etcdctl --endpoints="$EP" --command-timeout=10s "$@"; }

wait_healthy
# Every member has published its client URL.
for _ in $(seq 1 100); do
  [ "$(ctl member list | grep -cE ', http://[0-9.:]+, (true|false)$')" = 3 ] && break
  sleep 0.1
done

# From here on a failing command is a failed check, not the end of the run.
set +e

# --- KV ------------------------------------------------------------------------------
check "put"                 "OK"            "$(ctl put foo bar)"
check "get"                 $'foo\nbar'     "$(ctl get foo)"
check "get --print-value-only" "bar"        "$(ctl get foo --print-value-only)"
check "put foo2"            "OK"            "$(ctl put foo2 x)"
check "get --prefix --keys-only" $'foo\n\nfoo2' "$(ctl get foo --prefix --keys-only)"
check "del"                 "1"             "$(ctl del foo2)"
check "del missing"         "0"             "$(ctl del nothing-here)"
txn_out=$(printf 'value("foo") = "bar"\n\nput foo baz\n\nput foo nope\n\n' | ctl txn)
check "txn success branch"  $'SUCCESS\n\nOK' "$txn_out"
txn_out=$(printf 'value("foo") = "bar"\n\nput foo again\n\nget foo\n\n' | ctl txn)
check "txn failure branch"  $'FAILURE\n\nfoo\nbaz' "$txn_out"
check_re "get -w json"      '\{"header":\{"cluster_id":[0-9]+,"member_id":[0-9]+,"revision":[0-9]+,"raft_term":[0-9]+\},"kvs":\[\{"key":"Zm9v","create_revision":[0-9]+,"mod_revision":[0-9]+,"version":2,"value":"YmF6"\}\],"count":1\}' \
  "$(ctl get foo -w json)"

# --- watch ---------------------------------------------------------------------------
rev=$(ctl get foo -w json | python3 -c 'import json,sys; print(json.load(sys.stdin)["header"]["revision"])')
ctl put w 1 >/dev/null
ctl put w 2 >/dev/null
ctl del w >/dev/null
watch_out=$(timeout 3 etcdctl --endpoints="$EP" watch w --rev=$((rev + 1)) || true)
check "watch replays put/put/delete" $'PUT\nw\n1\nPUT\nw\n2\nDELETE\nw' "$watch_out"

# --- compaction ----------------------------------------------------------------------
check "compaction" "compacted revision $rev" "$(ctl compaction "$rev")"
compacted=$(ctl get foo --rev=1 2>&1 || true)
check_re "read below the compaction" '.*etcdserver: mvcc: required revision has been compacted.*' "$compacted"

# --- leases --------------------------------------------------------------------------
grant=$(ctl lease grant 60)
check_re "lease grant" 'lease [0-9a-f]+ granted with TTL\(60s\)' "$grant"
lease=$(echo "$grant" | awk '{print $2}')
check "put --lease"         "OK"            "$(ctl put leased v --lease="$lease")"
check_re "lease timetolive --keys" "lease $lease granted with TTL\(60s\), remaining\([0-9]+s\), attached keys\(\[leased\]\)" \
  "$(ctl lease timetolive "$lease" --keys)"
check "lease list"          "found 1 leases
$lease"                                     "$(ctl lease list)"
check "lease keep-alive --once" "lease $lease keepalived with TTL(60)" "$(ctl lease keep-alive --once "$lease")"
check "lease revoke"        "lease $lease revoked" "$(ctl lease revoke "$lease")"
check "revoke deleted the key" "" "$(ctl get leased)"
check "lease list after revoke" "found 0 leases" "$(ctl lease list)"

# --- lock ----------------------------------------------------------------------------
check_re "lock runs the command holding the lock" 'mylock/[0-9a-f]+' \
  "$(ctl lock mylock -- sh -c 'echo $ETCD_LOCK_KEY')"
check "lock released afterwards" "" "$(ctl get mylock --prefix --keys-only)"

# --- elect ---------------------------------------------------------------------------
"$ETCDCTL" --endpoints="$EP" elect myelection proposal-one >"$work/elect.out" 2>&1 &
elect_pid=$!
pids+=("$elect_pid")
for _ in $(seq 1 100); do [ -s "$work/elect.out" ] && break; sleep 0.1; done
check_re "elect prints the leader key and proposal" $'myelection/[0-9a-f]+\nproposal-one' "$(cat "$work/elect.out")"
listen=$(timeout 2 etcdctl --endpoints="$EP" elect -l myelection || true)
check_re "elect -l shows the current leader" $'myelection/[0-9a-f]+\nproposal-one' "$listen"
kill "$elect_pid" 2>/dev/null || true
wait "$elect_pid" 2>/dev/null || true
for _ in $(seq 1 100); do [ -z "$(ctl get myelection --prefix --keys-only)" ] && break; sleep 0.1; done
check "resigned on interrupt" "" "$(ctl get myelection --prefix --keys-only)"

# --- members -------------------------------------------------------------------------
members=$(ctl member list)
check_re "member list" '[0-9a-f]+, started, m[0-2], http://127\.0\.0\.1:[0-9]+, http://127\.0\.0\.1:[0-9]+, false
[0-9a-f]+, started, m[0-2], http://127\.0\.0\.1:[0-9]+, http://127\.0\.0\.1:[0-9]+, false
[0-9a-f]+, started, m[0-2], http://127\.0\.0\.1:[0-9]+, http://127\.0\.0\.1:[0-9]+, false' "$(echo "$members" | sort)"
learner_port=$(free_port)
added=$(ctl member add spare --peer-urls="http://127.0.0.1:$learner_port" --learner)
check_re "member add --learner" "Member +[0-9a-f]+ added to cluster +[0-9a-f]+

ETCD_NAME=\"spare\"
ETCD_INITIAL_CLUSTER=\".*spare=(http://)?127\.0\.0\.1:$learner_port.*\"
ETCD_INITIAL_ADVERTISE_PEER_URLS=\"http://127\.0\.0\.1:$learner_port\"
ETCD_INITIAL_CLUSTER_STATE=\"existing\"" "$added"
spare_id=$(echo "$added" | head -1 | awk '{print $2}')
check_re "learner listed unstarted" "$spare_id, unstarted, , http://127\.0\.0\.1:$learner_port, , true" \
  "$(ctl member list | grep "^$spare_id")"
check_re "member remove" "Member +$spare_id removed from cluster +[0-9a-f]+" "$(ctl member remove "$spare_id")"
check "member count after remove" "3" "$(ctl member list | wc -l | tr -d ' ')"

# --- endpoint status / health ----------------------------------------------------------
check_re "endpoint status" "127\.0\.0\.1:${clients[0]}, [0-9a-f]+, 3\.5\.0, [0-9.]+ [kM]?B, (true|false), false, [0-9]+, [0-9]+, [0-9]+, " \
  "$(ctl endpoint status)"
health=$(etcdctl --endpoints="$ALL" endpoint health 2>&1 | sort)
check_re "endpoint health (all members)" "127\.0\.0\.1:[0-9]+ is healthy: successfully committed proposal: took = [0-9.]+(ms|µs|s)
127\.0\.0\.1:[0-9]+ is healthy: successfully committed proposal: took = [0-9.]+(ms|µs|s)
127\.0\.0\.1:[0-9]+ is healthy: successfully committed proposal: took = [0-9.]+(ms|µs|s)" "$health"

# --- snapshot ------------------------------------------------------------------------
check "snapshot save" "Snapshot saved at $work/backup.db" "$(ctl snapshot save "$work/backup.db" 2>/dev/null)"
size=$(stat -c %s "$work/backup.db")
check "snapshot file is whole (512-byte blocks + sha256)" "32" "$((size % 512))"
# The file is etcd's own format: etcdctl reads its database.
check_re "snapshot status" '[0-9a-f]+, [0-9]+, [0-9]+, [0-9.]+ [kM]?B' \
  "$(etcdctl snapshot status "$work/backup.db" 2>/dev/null)"

# --- checks etcdctl runs against a cluster (smallest load) ---------------------------
# datascale reads process_resident_memory_bytes from the client URL's /metrics.
check_re "check datascale" '(.|
)*PASS: Approximate system memory used : [0-9.]+ MB\.' \
  "$(etcdctl --endpoints="$EP" check datascale --load=s 2>&1)"
# check perf judges throughput and latency against wall-clock limits (a shared
# machine may miss them), so only its report is checked here, not PASS/FAIL.
if [ "${version%%.*}" = 3 ] && [ "$(echo "$version" | cut -d. -f2)" -ge 5 ]; then
  check_re "check perf runs its load and reports" '(.|
)*(PASS|FAIL): Throughput is [0-9]+ writes/s(.|
)*' "$(etcdctl --endpoints="$ALL" check perf --load=s 2>&1)"
fi

# --- alarms --------------------------------------------------------------------------
check "alarm list (none)"   ""              "$(ctl alarm list)"
check "alarm disarm (none)" ""              "$(ctl alarm disarm)"

echo
if [ "$failures" -gt 0 ]; then
  echo "etcdctl-compat: $failures check(s) failed; member logs in $work are removed on exit:" >&2
  for f in "$work"/m*.log; do echo "== $f" >&2; tail -n 8 "$f" >&2; done
  exit 1
fi
echo "etcdctl-compat: every check passed"
