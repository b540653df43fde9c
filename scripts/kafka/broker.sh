#!/usr/bin/env bash
# Runs a real Apache Kafka 4.x broker (KRaft, combined broker+controller) assembled from
# Apache Kafka's jars on Maven Central (see scripts/kafka/pom.xml): by default a single-node
# cluster; with KAFKA_NODE_ID, KAFKA_QUORUM_VOTERS and KAFKA_REPLICAS one node of a larger one
# (scripts/kafka/cluster.sh runs three).
#
# Usage: scripts/kafka/broker.sh up|down|start|stop|kill|status|logs|jars
#   up      download jars if needed, format storage if new, start, wait until ready (idempotent)
#   down    stop the broker and delete its data (idempotent)
#   stop    stop the broker, keeping its data
#   kill    SIGKILL the broker (a crash), keeping its data
#   start   start the broker on its existing data (never formats)
#   status  exit 0 and print "running" if up, else exit 1 and print "stopped"
#   logs    print the broker log's path and its tail (KAFKA_LOG_LINES, default 100)
#   jars    download the jars if needed, nothing else
#
# Environment:
#   KAFKA_PORT             client listener port      (default 19092)
#   KAFKA_CONTROLLER_PORT  controller listener port  (default 19093)
#   KAFKA_HOST             address both listeners bind and advertise (default 127.0.0.1)
#   KAFKA_NODE_ID          this node's id            (default 1)
#   KAFKA_QUORUM_VOTERS    id@host:port of every controller (default this node alone)
#   KAFKA_REPLICAS         replicas of the internal topics, the nodes of the cluster (default 1)
#   KAFKA_LIB_DIR          where the jars live       (default KAFKA_HOME_DIR/lib)
#   KAFKA_HOME_DIR         state dir (default <repo>/.cache/kafka): lib/ data/ broker.pid
#                          broker.log server.properties
#   KAFKA_HEAP_OPTS        JVM heap options          (default -Xmx512m)
#   KAFKA_READY_TIMEOUT    seconds to wait for readiness (default 60)
#   JAVA_HOME              Java 17+ to use (default: java on PATH)
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"

PORT="${KAFKA_PORT:-19092}"
CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-19093}"
HOST="${KAFKA_HOST:-127.0.0.1}"
NODE_ID="${KAFKA_NODE_ID:-1}"
VOTERS="${KAFKA_QUORUM_VOTERS:-$NODE_ID@$HOST:$CONTROLLER_PORT}"
REPLICAS="${KAFKA_REPLICAS:-1}"
# With three copies, a write acknowledged by two survives the loss of any one node.
if (( REPLICAS >= 3 )); then MIN_ISR=2; else MIN_ISR=1; fi
HOME_DIR="$(realpath -m "${KAFKA_HOME_DIR:-$REPO_ROOT/.cache/kafka}")"
HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xmx512m}"
READY_TIMEOUT="${KAFKA_READY_TIMEOUT:-60}"
STOP_TIMEOUT=30

LIB_DIR="${KAFKA_LIB_DIR:-$HOME_DIR/lib}"
DATA_DIR="$HOME_DIR/data"
LOG_DIRS="$DATA_DIR/kraft-logs"
PID_FILE="$HOME_DIR/broker.pid"
LOG_FILE="$HOME_DIR/broker.log"
CONFIG_FILE="$HOME_DIR/server.properties"
POM="$SCRIPT_DIR/pom.xml"
LOG4J_CONFIG="$SCRIPT_DIR/log4j2.properties"
# Fixed cluster id: base64url("kafkaworkers-tst"), 16 bytes -> 22 chars.
CLUSTER_ID="a2Fma2F3b3JrZXJzLXRzdA"

if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then
    JAVA="$JAVA_HOME/bin/java"
else
    JAVA="java"
fi

log() { echo "broker.sh: $*" >&2; }
die() { log "$*"; exit 1; }

# --- helpers ----------------------------------------------------------------

# True if pid $1 is a live (non-zombie) Kafka broker process.
pid_is_broker() {
    local pid="$1" state
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    state="$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || true)"
    [[ "$state" != "Z" ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'kafka\.Kafka'
}

# Prints the pid from the pid file if that process is a live broker.
running_pid() {
    local pid
    [[ -f "$PID_FILE" ]] || return 1
    pid="$(cat "$PID_FILE" 2>/dev/null || true)"
    pid_is_broker "$pid" || return 1
    echo "$pid"
}

port_open() {
    timeout 2 bash -c "exec 3<>/dev/tcp/$HOST/$1" 2>/dev/null
}

is_formatted() {
    [[ -f "$LOG_DIRS/meta.properties" ]]
}

jars_present() {
    local want
    want="$(sha256sum "$POM" | awk '{print $1}')"
    [[ -f "$LIB_DIR/.pom.sha256" && "$(cat "$LIB_DIR/.pom.sha256")" == "$want" ]] \
        && compgen -G "$LIB_DIR/kafka_2.13-*.jar" >/dev/null
}

ensure_jars() {
    if jars_present; then
        return 0
    fi
    command -v mvn >/dev/null || die "mvn not found: Apache Maven is needed to fetch Kafka's jars"
    log "fetching Kafka jars from Maven Central into $LIB_DIR (first run only) ..."
    local tmp="$HOME_DIR/lib.tmp.$$"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    # Maven's output is shown only if it fails (-q still prints stray ANSI resets).
    if ! mvn -B -q -f "$POM" dependency:copy-dependencies -Dkafka.lib.dir="$tmp" \
        >"$HOME_DIR/mvn.log" 2>&1; then
        cat "$HOME_DIR/mvn.log" >&2
        rm -rf "$tmp"
        die "mvn dependency:copy-dependencies failed (output above, also in $HOME_DIR/mvn.log)"
    fi
    sha256sum "$POM" | awk '{print $1}' >"$tmp/.pom.sha256"
    rm -rf "$LIB_DIR"
    mv "$tmp" "$LIB_DIR"
}

check_java() {
    command -v "$JAVA" >/dev/null || die "java not found (Java 17+ is needed)"
    local ver major
    ver="$("$JAVA" -version 2>&1 | awk -F'"' '/version/ {print $2; exit}')"
    major="${ver%%.*}"
    [[ "$major" =~ ^[0-9]+$ && "$major" -ge 17 ]] || die "Java 17+ is needed, found '$ver'"
}

write_config() {
    mkdir -p "$HOME_DIR"
    cat >"$CONFIG_FILE" <<EOF
# Generated by scripts/kafka/broker.sh; rewritten on every start.
process.roles=broker,controller
node.id=$NODE_ID
controller.quorum.voters=$VOTERS
listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$HOST:$PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$LOG_DIRS

# Every internal topic has a replica on each node (one on a single node). The broker-wide
# min.insync.replicas stays 1: topics made with fewer copies must still take writes;
# "kafkaworkers topics create" sets 2 on its own topics in a cluster of three.
offsets.topic.replication.factor=$REPLICAS
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=$REPLICAS
transaction.state.log.min.isr=$MIN_ISR
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=$REPLICAS
share.coordinator.state.topic.min.isr=$MIN_ISR
share.coordinator.state.topic.num.partitions=1
default.replication.factor=$REPLICAS
min.insync.replicas=1

# The framework creates its own topics explicitly.
num.partitions=1
auto.create.topics.enable=false
group.initial.rebalance.delay.ms=0

# Tests send payloads up to a few MiB.
message.max.bytes=4194304
replica.fetch.max.bytes=4194304

# Small-heap friendly (the cleaner allocates its dedupe buffer on the heap).
log.cleaner.dedupe.buffer.size=16777216
EOF
}

format_storage() {
    log "formatting storage in $LOG_DIRS (cluster id $CLUSTER_ID)"
    mkdir -p "$DATA_DIR"
    if ! "$JAVA" -Xmx256m -cp "$LIB_DIR/*" \
        -Dlog4j2.configurationFile="$LOG4J_CONFIG" -Dkafka.log.file="$LOG_FILE" \
        kafka.tools.StorageTool format -t "$CLUSTER_ID" -c "$CONFIG_FILE" >>"$LOG_FILE" 2>&1; then
        fail_with_log "formatting storage failed"
    fi
}

print_log_tail() {
    if [[ -f "$LOG_FILE" ]]; then
        # The first errors often scroll out of the tail behind shutdown chatter.
        if grep -q -E '^\[[^]]*\] (ERROR|FATAL) ' "$LOG_FILE"; then
            echo "----- first ERROR lines of $LOG_FILE -----" >&2
            grep -m 10 -E '^\[[^]]*\] (ERROR|FATAL) ' "$LOG_FILE" | cut -c1-400 >&2
        fi
        echo "----- last 80 lines of $LOG_FILE -----" >&2
        tail -n 80 "$LOG_FILE" >&2
        echo "----- end of $LOG_FILE -----" >&2
    else
        echo "(no broker log at $LOG_FILE)" >&2
    fi
}

fail_with_log() {
    log "$*"
    print_log_tail
    exit 1
}

# Stops the broker in the pid file (if any): SIGTERM, wait, then SIGKILL.
stop_broker() {
    local pid waited=0
    if ! pid="$(running_pid)"; then
        rm -f "$PID_FILE"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    while pid_is_broker "$pid"; do
        if (( waited >= STOP_TIMEOUT * 4 )); then
            log "broker (pid $pid) did not exit in ${STOP_TIMEOUT}s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
            break
        fi
        sleep 0.25
        waited=$((waited + 1))
    done
    rm -f "$PID_FILE"
    log "broker stopped (pid $pid)"
}

# Starts the broker; $1 = "format-if-new" or "no-format".
start_broker() {
    local mode="$1" pid start_s now elapsed

    if pid="$(running_pid)"; then
        if port_open "$PORT"; then
            echo "Kafka already running on $HOST:$PORT (pid $pid)"
            return 0
        fi
        log "broker pid $pid is alive but $HOST:$PORT is not open; restarting it"
        stop_broker
    fi
    rm -f "$PID_FILE"

    check_java
    ensure_jars
    [[ -f "$LOG4J_CONFIG" ]] || die "missing $LOG4J_CONFIG"
    mkdir -p "$HOME_DIR"

    # Fresh log for this run (the previous one is kept as broker.log.prev).
    if [[ -f "$LOG_FILE" ]]; then
        mv -f "$LOG_FILE" "$LOG_FILE.prev"
    fi
    : >"$LOG_FILE"

    write_config
    if ! is_formatted; then
        if [[ "$mode" == "no-format" ]]; then
            die "no formatted data in $DATA_DIR; use 'up' to create a new broker"
        fi
        rm -rf "$DATA_DIR"
        format_storage
    fi

    local -a heap_opts
    read -r -a heap_opts <<<"$HEAP_OPTS"
    start_s=$SECONDS
    # setsid: own session, so the broker survives the calling shell; the inner bash
    # writes its own pid and execs java, so the pid file holds the JVM's pid.
    # fd 9 (the lock) is closed so the broker does not hold it.
    # shellcheck disable=SC2016  # $$ and $0 expand in the inner bash, on purpose
    setsid nohup bash -c 'echo $$ >"$0"; exec "$@"' "$PID_FILE" \
        "$JAVA" "${heap_opts[@]}" -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
        -Dlog4j2.configurationFile="$LOG4J_CONFIG" -Dkafka.log.file="$LOG_FILE" \
        -cp "$LIB_DIR/*" kafka.Kafka "$CONFIG_FILE" \
        </dev/null >>"$LOG_FILE" 2>&1 9>&- &

    # Wait for the pid file.
    for _ in $(seq 1 40); do
        [[ -s "$PID_FILE" ]] && break
        sleep 0.05
    done
    pid="$(cat "$PID_FILE" 2>/dev/null || true)"
    [[ -n "$pid" ]] || fail_with_log "broker did not start (no pid written)"

    # Ready = process alive, "Kafka Server started" logged by this run, client port open.
    # (The log line guards against some other process holding the port.)
    while true; do
        if ! kill -0 "$pid" 2>/dev/null || [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" == "Z" ]]; then
            rm -f "$PID_FILE"
            fail_with_log "broker process $pid exited during start-up"
        fi
        if grep -q 'Kafka Server started' "$LOG_FILE" && port_open "$PORT"; then
            break
        fi
        now=$SECONDS
        elapsed=$((now - start_s))
        if (( elapsed >= READY_TIMEOUT )); then
            log "broker not ready after ${READY_TIMEOUT}s"
            print_log_tail
            stop_broker
            exit 1
        fi
        sleep 0.25
    done
    elapsed=$((SECONDS - start_s))
    echo "Kafka up on $HOST:$PORT (${elapsed}s)"
}

# --- subcommands ------------------------------------------------------------

with_lock() {
    mkdir -p "$HOME_DIR"
    exec 9>"$HOME_DIR/.lock"
    if ! flock -w 120 9; then
        die "could not take lock $HOME_DIR/.lock"
    fi
}

cmd="${1:-}"
case "$cmd" in
    up)
        with_lock
        start_broker format-if-new
        ;;
    start)
        with_lock
        start_broker no-format
        ;;
    stop)
        with_lock
        stop_broker
        ;;
    kill)
        with_lock
        if pid="$(running_pid)"; then
            kill -KILL "$pid"
            while pid_is_broker "$pid"; do sleep 0.05; done
            log "broker killed (pid $pid)"
        fi
        rm -f "$PID_FILE"
        ;;
    down)
        with_lock
        stop_broker
        rm -rf "$DATA_DIR"
        rm -f "$PID_FILE"
        ;;
    status)
        if pid="$(running_pid)" && port_open "$PORT"; then
            echo "running"
            exit 0
        fi
        echo "stopped"
        exit 1
        ;;
    jars)
        mkdir -p "$HOME_DIR"
        ensure_jars
        ;;
    logs)
        echo "$LOG_FILE"
        if [[ -f "$LOG_FILE" ]]; then
            tail -n "${KAFKA_LOG_LINES:-100}" "$LOG_FILE"
        fi
        ;;
    *)
        sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
        exit 2
        ;;
esac
