# Sourced by the scripts that drive a real meshd cluster with outside clients.
# start_cluster N [extra meshd flags...] starts N members on free loopback ports with
# short ticks and sets: work (temp dir, removed on exit), pids, clients (ports),
# meshes (ports), ALL (client endpoints, comma-separated). wait_healthy waits until
# every member answers /health on its client port.

MESHD=${MESHD:-${CARGO_TARGET_DIR:-target}/debug/meshd}
[ -x "$MESHD" ] || { echo "$0: $MESHD is missing (cargo build --workspace --bins)" >&2; exit 1; }

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start_cluster() {
  local n=$1; shift
  clients=(); meshes=()
  local i initial=""
  for ((i = 0; i < n; i++)); do
    clients+=("$(free_port)"); meshes+=("$(free_port)")
    initial+="${initial:+,}m$i=127.0.0.1:${meshes[$i]}"
  done
  for ((i = 0; i < n; i++)); do
    "$MESHD" --name "m$i" --data-dir "$work/m$i" \
      --listen-client "127.0.0.1:${clients[$i]}" --listen-mesh "127.0.0.1:${meshes[$i]}" \
      --initial-cluster "$initial" --tick 25ms --election-ticks 12 --heartbeat-ticks 2 \
      --mesh-heartbeat 100ms --mesh-gossip-interval 100ms "$@" \
      >"$work/m$i.log" 2>&1 &
    pids+=($!)
    disown
  done
  ALL=$(printf '127.0.0.1:%s,' "${clients[@]}"); ALL=${ALL%,}
}

wait_healthy() {
  local _ p port ok
  for _ in $(seq 1 150); do
    for p in "${pids[@]}"; do
      kill -0 "$p" 2>/dev/null || { tail -n 20 "$work"/*.log >&2; echo "$0: a member exited at start" >&2; exit 1; }
    done
    ok=1
    for port in "${clients[@]}"; do
      curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 || { ok=0; break; }
    done
    [ "$ok" = 1 ] && return 0
    sleep 0.2
  done
  tail -n 20 "$work"/*.log >&2
  echo "$0: the cluster did not become healthy" >&2
  exit 1
}
