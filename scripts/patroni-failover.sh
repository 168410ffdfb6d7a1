#!/usr/bin/env bash
# PostgreSQL high availability on meshd: Patroni (Debian's package) with its etcd3 DCS
# (etcd's JSON gateway) pointed at a three-member meshd cluster. A primary and a
# replica come up, the leader key is in meshd, killing the primary (Patroni and
# PostgreSQL, as a machine crash would) promotes the replica, and `patronictl list`
# shows it. Run by scripts/test; installs patroni and postgresql when missing.
#
#   scripts/patroni-failover.sh           # uses target/debug/meshd
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v patroni >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq patroni postgresql >/dev/null
fi
bin_dir=$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n 1)")
source scripts/lib/cluster.sh
start=$(date +%s)

start_cluster 3 --listen-metrics off
wait_healthy
hosts=$(printf '127.0.0.1:%s,' "${clients[@]}"); hosts=${hosts%,}

# PostgreSQL refuses to run as root: as root, Patroni runs as the postgres user.
as_pg=()
if [ "$(id -u)" = 0 ]; then
  chmod 755 "$work"
  as_pg=(runuser -u postgres --)
fi
pg="$work/pg"
mkdir -p "$pg"
[ "$(id -u)" = 0 ] && chown postgres "$pg"

scope=meshd-demo
for i in 0 1; do
  api=$(free_port); port=$(free_port)
  cat >"$pg/pg$i.yml" <<YAML
scope: $scope
name: pg$i
restapi:
  listen: 127.0.0.1:$api
  connect_address: 127.0.0.1:$api
etcd3:
  hosts: $hosts
bootstrap:
  dcs:
    ttl: 10
    loop_wait: 1
    retry_timeout: 4
    maximum_lag_on_failover: 1048576
  initdb:
  - encoding: UTF8
  pg_hba:
  - host replication replicator 127.0.0.1/32 trust
  - host all all 127.0.0.1/32 trust
postgresql:
  listen: 127.0.0.1:$port
  connect_address: 127.0.0.1:$port
  data_dir: $pg/data$i
  bin_dir: $bin_dir
  pgpass: $pg/pgpass$i
  authentication:
    replication: {username: replicator, password: rep}
    superuser: {username: postgres, password: pg}
  parameters:
    unix_socket_directories: $pg
    max_connections: 20
    shared_buffers: 16MB
YAML
  [ "$(id -u)" = 0 ] && chown postgres "$pg/pg$i.yml"
  "${as_pg[@]}" patroni "$pg/pg$i.yml" >"$work/patroni$i.log" 2>&1 &
  pids+=($!)
  # The replica starts once the primary holds the leader key.
  if [ "$i" = 0 ]; then
    for _ in $(seq 1 300); do
      curl -sf "http://127.0.0.1:$api/primary" >/dev/null 2>&1 && break
      sleep 0.2
    done
  fi
done

fail() {
  echo "patroni-failover: $*" >&2
  for f in "$work"/patroni*.log; do echo "== $f" >&2; tail -n 25 "$f" >&2; done
  exit 1
}
ctl() { "${as_pg[@]}" patronictl -c "$pg/pg0.yml" "$@" 2>/dev/null; }
leader_key() {
  ETCDCTL_API=3 etcdctl --endpoints="$ALL" get "/service/$scope/leader" --print-value-only 2>/dev/null
}
# wait_for DESCRIPTION SECONDS COMMAND...: until COMMAND succeeds.
wait_for() {
  local what=$1 secs=$2; shift 2
  local end=$(( $(date +%s) + secs ))
  until "$@"; do
    [ "$(date +%s)" -lt "$end" ] || fail "timed out after ${secs}s waiting for $what"
    sleep 0.5
  done
}
is_leader() { ctl list -f json | python3 -c "import json,sys; m={x['Member']:x for x in json.load(sys.stdin)}; sys.exit(0 if m.get('$1',{}).get('Role')=='Leader' else 1)"; }
is_streaming_replica() { ctl list -f json | python3 -c "import json,sys; m={x['Member']:x for x in json.load(sys.stdin)}; r=m.get('$1',{}); sys.exit(0 if r.get('Role') in ('Replica','Sync Standby') and r.get('State') in ('running','streaming') else 1)"; }

wait_for "pg0 to lead" 120 is_leader pg0
wait_for "pg1 to replicate" 120 is_streaming_replica pg1
[ "$(leader_key)" = pg0 ] || fail "leader key in meshd is '$(leader_key)', expected pg0"
echo "ok   primary pg0 and replica pg1 up; /service/$scope/leader = pg0 in meshd"
ctl list

# The primary's machine dies: Patroni and PostgreSQL killed at once.
pkill -9 -f "patroni $pg/pg0.yml" || true
pkill -9 -f "$pg/data0" || true
wait_for "pg1 to be promoted" 120 is_leader pg1
[ "$(leader_key)" = pg1 ] || fail "leader key in meshd is '$(leader_key)', expected pg1"
echo "ok   pg1 promoted after the primary was killed; /service/$scope/leader = pg1"
ctl list
echo "patroni-failover: passed in $(( $(date +%s) - start ))s"
