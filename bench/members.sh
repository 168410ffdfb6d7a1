# Sourced by bench/datascale.sh and bench/longrun.sh (after scripts/lib/cluster.sh, for
# work, pids and free_port): members of meshd or etcd on loopback.
#
#   cport[I], pport[I]    client and peer (meshd: mesh) port of member I, set by the caller
#   initial SYSTEM N      the --initial-cluster value naming members 0..N-1
#   start_member SYSTEM I INIT STATE [FLAGS...]
#                         member I of SYSTEM (meshd, etcd-3.4.23 or etcd-3.5.1) in
#                         $work/SYSTEM-mI, logging to $work/SYSTEM-mI.log, its pid in mpid[I].
#                         STATE is new or existing (meshd: joins through member 0's mesh
#                         port); an empty INIT starts meshd on its own. FLAGS are given to
#                         either system (both name --quota-backend-bytes and
#                         --auto-compaction-* alike).
#   stop_members          SIGTERM to every started member, and wait until each is gone
#   json EXPR             EXPR of the JSON document on stdin (as d)

E351="$(scripts/etcd-3.5.1)"
MESHD=${MESHD:-target/release/meshd}
declare -A mpid cport pport

json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

initial() {
  local i out="" scheme=""
  [ "$1" = meshd ] || scheme=http://
  for ((i = 0; i < $2; i++)); do out+="${out:+,}m$i=${scheme}127.0.0.1:${pport[$i]}"; done
  echo "$out"
}

start_member() {
  local sys=$1 i=$2 init=$3 state=$4 dir="$work/$1-m$2"
  shift 4
  case "$sys" in
    meshd)
      local cluster=()
      [ -n "$init" ] && cluster=(--initial-cluster "$init")
      [ "$state" = existing ] && cluster=(--peer "127.0.0.1:${pport[0]}")
      "$MESHD" --name "m$i" --data-dir "$dir" --listen-client "127.0.0.1:${cport[$i]}" \
        --listen-mesh "127.0.0.1:${pport[$i]}" --listen-metrics off \
        "${cluster[@]}" "$@" >>"$dir.log" 2>&1 &
      ;;
    etcd-*)
      local bin=etcd
      [ "$sys" = etcd-3.5.1 ] && bin="$E351/etcd"
      "$bin" --name "m$i" --data-dir "$dir" \
        --listen-client-urls "http://127.0.0.1:${cport[$i]}" \
        --advertise-client-urls "http://127.0.0.1:${cport[$i]}" \
        --listen-peer-urls "http://127.0.0.1:${pport[$i]}" \
        --initial-advertise-peer-urls "http://127.0.0.1:${pport[$i]}" \
        --initial-cluster "$init" --initial-cluster-state "$state" "$@" >>"$dir.log" 2>&1 &
      ;;
  esac
  mpid[$i]=$!
  pids+=("${mpid[$i]}")
}

stop_members() {
  local i
  for i in "${!mpid[@]}"; do kill "${mpid[$i]}" 2>/dev/null || true; done
  for i in "${!mpid[@]}"; do
    while kill -0 "${mpid[$i]}" 2>/dev/null; do sleep 0.1; done
  done
}
