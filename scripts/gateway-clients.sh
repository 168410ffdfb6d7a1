#!/usr/bin/env bash
# Real applications of etcd's JSON gateway against a three-member meshd cluster:
# etcd3gw (PyPI, the client OpenStack uses) runs tests/clients/etcd3gw_check.py,
# which asserts put/get/delete, txn, watch, lease and lock results. Run by
# scripts/test; installs etcd3gw into a virtualenv under target/.
#
#   scripts/gateway-clients.sh            # uses target/debug/meshd
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/cluster.sh

venv="${CARGO_TARGET_DIR:-target}/py-clients"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import etcd3gw' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'etcd3gw==2.7.0'
fi

start_cluster 3 --listen-metrics off
wait_healthy
endpoints=()
for port in "${clients[@]}"; do endpoints+=("127.0.0.1:$port"); done
if ! "$venv/bin/python" tests/clients/etcd3gw_check.py "${endpoints[@]}"; then
  tail -n 20 "$work"/*.log >&2
  echo "gateway-clients: etcd3gw failed" >&2
  exit 1
fi
