#!/usr/bin/env bash
# Runs a replicated Apache Kafka cluster on this machine: three KRaft nodes, each a broker and
# one of three controllers, each a scripts/kafka/broker.sh with a node id, ports and a state
# dir of its own, from the same jars as the single broker.
#
# Usage: scripts/kafka/cluster.sh up|down|status|bootstrap
#        scripts/kafka/cluster.sh start|stop|kill|logs NODE     (NODE = 1, 2 or 3)
#   up         start the three nodes together (a controller quorum needs two of them) and
#              wait until each is ready (idempotent); formats new storage
#   down       stop the three nodes and delete their data (idempotent)
#   status     one line per node, exit 1 unless all three run
#   bootstrap  print the bootstrap servers, e.g. 127.0.0.1:29092,127.0.0.1:29093,127.0.0.1:29094
#   start/stop/kill/logs NODE   one node, as broker.sh does it (kill = SIGKILL, a crash)
#
# Environment:
#   KAFKA_CLUSTER_HOST     address the nodes bind and advertise (default 127.0.0.1; the
#                          cluster tests pass their bridge's address)
#   KAFKA_CLUSTER_PORT     client port of node 1; nodes 2 and 3 take the next two
#                          (default 29092); controller ports are these plus 100
#   KAFKA_CLUSTER_HOME     state dir, one sub-dir per node (default <repo>/.cache/kafka-cluster)
#   KAFKA_LIB_DIR          the jars (default <repo>/.cache/kafka/lib, the single broker's)
#   KAFKA_HEAP_OPTS        per node (default -Xmx384m)
#   KAFKA_READY_TIMEOUT    seconds a node may take to be ready (default 180)
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
BROKER="$SCRIPT_DIR/broker.sh"

HOST="${KAFKA_CLUSTER_HOST:-127.0.0.1}"
BASE_PORT="${KAFKA_CLUSTER_PORT:-29092}"
HOME_DIR="$(realpath -m "${KAFKA_CLUSTER_HOME:-$REPO_ROOT/.cache/kafka-cluster}")"
export KAFKA_LIB_DIR="${KAFKA_LIB_DIR:-$REPO_ROOT/.cache/kafka/lib}"
export KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xmx384m}"
# A node started again after a SIGKILL first recovers its logs, and on a loaded machine three
# JVMs and the workers share the cores: give it longer than a single broker's start.
export KAFKA_READY_TIMEOUT="${KAFKA_READY_TIMEOUT:-180}"
NODES=(1 2 3)

port() { echo $((BASE_PORT + $1 - 1)); }
controller_port() { echo $((BASE_PORT + 100 + $1 - 1)); }

VOTERS=""
for n in "${NODES[@]}"; do
    VOTERS+="${VOTERS:+,}$n@$HOST:$(controller_port "$n")"
done

# Runs broker.sh $2... as node $1.
node() {
    local n="$1"
    shift
    KAFKA_HOME_DIR="$HOME_DIR/node-$n" KAFKA_NODE_ID="$n" KAFKA_HOST="$HOST" \
        KAFKA_PORT="$(port "$n")" KAFKA_CONTROLLER_PORT="$(controller_port "$n")" \
        KAFKA_QUORUM_VOTERS="$VOTERS" KAFKA_REPLICAS="${#NODES[@]}" \
        bash "$BROKER" "$@"
}

check_node() {
    [[ "${1:-}" =~ ^[123]$ ]] || { echo "cluster.sh: NODE must be 1, 2 or 3, got '${1:-}'" >&2; exit 2; }
}

cmd="${1:-}"
case "$cmd" in
    up)
        mkdir -p "$HOME_DIR"
        node 1 jars
        # Together: a node is ready only once a quorum of controllers elected a leader.
        pids=()
        for n in "${NODES[@]}"; do
            node "$n" up &
            pids+=($!)
        done
        failed=0
        for pid in "${pids[@]}"; do
            wait "$pid" || failed=1
        done
        if (( failed )); then
            echo "cluster.sh: a node did not start (its log is above); stopping the others" >&2
            for n in "${NODES[@]}"; do node "$n" stop || true; done
            exit 1
        fi
        echo "Kafka cluster up: $("$0" bootstrap)"
        ;;
    down)
        for n in "${NODES[@]}"; do node "$n" down; done
        ;;
    status)
        all=0
        for n in "${NODES[@]}"; do
            state="$(node "$n" status)" || all=1
            echo "node $n $HOST:$(port "$n") $state"
        done
        exit "$all"
        ;;
    bootstrap)
        servers=""
        for n in "${NODES[@]}"; do servers+="${servers:+,}$HOST:$(port "$n")"; done
        echo "$servers"
        ;;
    start | stop | kill | logs)
        check_node "${2:-}"
        node "$2" "$cmd"
        ;;
    *)
        sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
        exit 2
        ;;
esac
