#!/usr/bin/env bash
# End-to-end load benchmark on loopback: smtp-source -> moat -> smtp-sink, against smtp-source -> smtp-sink
# directly, in one run, for three shapes:
#   a) 5000 messages x 10 KiB, 20 sessions, a new connection per message
#   b) the same, with connections reused (smtp-source -d: "don't disconnect after sending a message")
#   c) 500 messages x 1 MiB, 4 sessions, a new connection per message
# For each: msgs/s, MiB/s, moat/direct ratio, moat CPU seconds and messages per CPU-second (from
# /proc/PID/stat utime+stime), smtp-sink's CPU beside it; then moat's peak RSS (VmHWM) and the memory one
# idle client connection costs (RSS delta over N idle connections that got their greeting).
#
#   scripts/bench-e2e.sh                  (needs target/release/moat: cargo build --release)
#   scripts/bench-e2e.sh --direct-only    only the smtp-source -> smtp-sink half
# Environment: MOAT_BIN (default target/release/moat), BENCH_QUICK=1 (a tenth of the messages),
#              IDLE_CONNS (default 500), BENCH_REVERSE_DNS=true (moat looks up 127.0.0.1; default off),
#              BENCH_SHAPES="a b c" (which shapes to run), BENCH_RULES=off (no rule files),
#              BENCH_CONFIG (default config/moat.toml: the config the bench copy is made from),
#              BENCH_STATE=redis: moat keeps its state in a redis-server started on a free loopback port
#              (docs/fleet.md); the Redis commands each shape cost are printed after it (INFO commandstats),
#              BENCH_PIN=1: smtp-source and smtp-sink share CPU 0 and moat gets CPU 1 (taskset). On a 2-core
#              machine the default run is CPU-bound: source and sink alone keep both cores busy, so every
#              cycle moat uses is taken from them. Pinned, the direct path has one core and the moat path
#              the same core plus one for moat: it shows whether moat, given a core of its own as in
#              production, slows the mail flow. Reported beside the default, never instead of it.
#
# Everything runs on 127.0.0.1; every process this script starts is killed on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/bench-lib.sh
. "$ROOT/scripts/bench-lib.sh"
MOAT_BIN=${MOAT_BIN:-$ROOT/target/release/moat}
CONFIG_SRC=${BENCH_CONFIG:-$ROOT/config/moat.toml}
SHAPES=${BENCH_SHAPES:-a b c}
PEERS_CPU=()
MOAT_CPU=()
if [ "${BENCH_PIN:-}" = 1 ]; then
    command -v taskset >/dev/null || { echo "bench: BENCH_PIN=1 needs taskset (util-linux)" >&2; exit 1; }
    PEERS_CPU=(taskset -c 0)
    MOAT_CPU=(taskset -c 1)
fi
IDLE_CONNS=${IDLE_CONNS:-500}
DIRECT_ONLY=0
[ "${1:-}" = "--direct-only" ] && DIRECT_ONLY=1
SMTP_SOURCE=$(command -v smtp-source || echo /usr/sbin/smtp-source)
SMTP_SINK=$(command -v smtp-sink || echo /usr/sbin/smtp-sink)
PY=$(command -v python3) || { echo "bench: python3 is required" >&2; exit 1; }
HZ=$(getconf CLK_TCK)
DIV=1
[ "${BENCH_QUICK:-}" = 1 ] && DIV=10

die() { echo "bench: $*" >&2; exit 1; }
if [ ! -x "$SMTP_SOURCE" ] || [ ! -x "$SMTP_SINK" ]; then die "smtp-source/smtp-sink not found (apt-get install postfix)"; fi
if [ "$DIRECT_ONLY" = 0 ] && [ ! -x "$MOAT_BIN" ]; then
    die "$MOAT_BIN not found: run 'cargo build --release' first (or use --direct-only)"
fi

WORK=$(mktemp -d /tmp/moat-bench.XXXXXX)
SINK_PID=""
MOAT_PID=""
IDLE_PID=""
REDIS_PID=""
cleanup() {
    # shellcheck disable=SC2086 # empty ones vanish
    stop_pids $IDLE_PID $MOAT_PID $SINK_PID $REDIS_PID
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Many short connections need file descriptors (moat holds two per relayed session).
ulimit -n 8192 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true


# utime+stime of PID in clock ticks (fields 14 and 15 of /proc/PID/stat, after the "(comm)").
cpu_ticks() {
    local s
    s=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
    s=${s##*) }
    # After "(comm) ", field 3 is state; utime/stime are fields 14/15 overall, so 12/13 here.
    echo "$s" | awk '{ print $12 + $13 }'
}

status_kb() { # pid field
    awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0
}

now() { date +%s.%N; }

# ---------------------------------------------------------------- smtp-sink
SINK_PORT=$(free_port)
# -u: smtp-sink must drop root after binding; -m: simultaneous connections (default 256); backlog 1024.
# smtp-sink announces PIPELINING, 8BITMIME, XCLIENT, etc.; it throws every message away.
if [ "$(id -u)" = 0 ]; then SINK_USER=(-u nobody); else SINK_USER=(); fi
"${PEERS_CPU[@]}" "$SMTP_SINK" "${SINK_USER[@]}" -m 2048 -t 100 "127.0.0.1:$SINK_PORT" 1024 >"$WORK/sink.log" 2>&1 &
SINK_PID=$!
wait_listening "$SINK_PORT" "$SINK_PID" smtp-sink

# ---------------------------------------------------------------- moat
MOAT_PORT=""
if [ "$DIRECT_ONLY" = 0 ]; then
    MOAT_PORT=$(free_port)
    # A copy of config/moat.toml: the shipped listeners replaced by one plain listener on a free port,
    # upstream = smtp-sink without client identity, metrics off, connection limits above IDLE_CONNS.
    RULES_KEY=()
    [ "${BENCH_RULES:-on}" = off ] && RULES_KEY=('rules.directory=""')
    if [ "${BENCH_STATE:-memory}" = redis ]; then
        command -v redis-server >/dev/null || die "BENCH_STATE=redis needs redis-server"
        REDIS_PORT=$(free_port)
        redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no >"$WORK/redis.log" 2>&1 &
        REDIS_PID=$!
        wait_listening "$REDIS_PORT" "$REDIS_PID" redis-server
        RULES_KEY+=('state.backend="redis"' "state.url=\"redis://127.0.0.1:$REDIS_PORT/0\"")
    fi
    "$PY" "$ROOT/scripts/bench-config.py" "$CONFIG_SRC" "$WORK/moat.toml" "$MOAT_PORT" \
        "upstream.address=\"127.0.0.1:$SINK_PORT\"" 'upstream.identity="none"' 'metrics.address=""' \
        "server.reverse_dns=${BENCH_REVERSE_DNS:-false}" "limits.max_connections=$((IDLE_CONNS + 1000))" \
        "limits.max_connections_per_ip=$((IDLE_CONNS + 1000))" 'relay.local_domains=["sink.example"]' \
        "${RULES_KEY[@]}"
    "$MOAT_BIN" check --config "$WORK/moat.toml" >/dev/null || die "moat check rejects $WORK/moat.toml"
    "${MOAT_CPU[@]}" "$MOAT_BIN" serve --config "$WORK/moat.toml" >"$WORK/moat.log" 2>&1 &
    MOAT_PID=$!
    wait_listening "$MOAT_PORT" "$MOAT_PID" moat
fi

# ---------------------------------------------------------------- idle connections
# Opens N connections to moat, waits until each has its 220 greeting, writes "N" to idle.ready, holds
# them until idle.stop exists (at most 120s), then closes them.
cat >"$WORK/idle.py" <<'PYEOF'
import os, socket, sys, time
port, n, ready, stop = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
socks, greeted = [], 0
deadline = time.time() + 60
for _ in range(n):
    socks.append(socket.create_connection(("127.0.0.1", port), timeout=30))
for s in socks:
    buf = b""
    while b"\r\n" not in buf and time.time() < deadline:
        chunk = s.recv(512)
        if not chunk:
            break
        buf += chunk
    if buf.startswith(b"220"):
        greeted += 1
with open(ready + ".tmp", "w") as f:
    f.write(f"{greeted}\n")
os.rename(ready + ".tmp", ready)
end = time.time() + 120
while not os.path.exists(stop) and time.time() < end:
    time.sleep(0.1)
PYEOF

idle_mem() { # N -> prints one line
    local n=$1 before after ready=""
    before=$(status_kb "$MOAT_PID" VmRSS)
    "$PY" "$WORK/idle.py" "$MOAT_PORT" "$n" "$WORK/idle.ready" "$WORK/idle.stop" 2>"$WORK/idle.err" &
    IDLE_PID=$!
    for _ in $(seq 1 900); do
        [ -s "$WORK/idle.ready" ] && break
        kill -0 "$IDLE_PID" 2>/dev/null || break
        sleep 0.1
    done
    [ -s "$WORK/idle.ready" ] && ready=$(cat "$WORK/idle.ready")
    sleep 1
    after=$(status_kb "$MOAT_PID" VmRSS)
    touch "$WORK/idle.stop"
    wait "$IDLE_PID" 2>/dev/null || true
    IDLE_PID=""
    if [ "${ready:-0}" -gt 0 ]; then
        awk -v b="$before" -v a="$after" -v n="$ready" -v want="$n" 'BEGIN {
            printf "idle connections: %d of %d greeted; moat RSS %d kB -> %d kB: %.1f KiB per idle connection\n",
                n, want, b, a, (a - b) / n }'
    else
        echo "idle connections: none greeted: $(head -c 300 "$WORK/idle.err")"
    fi
}

# ---------------------------------------------------------------- runs
# Redis work since the last call (INFO commandstats, reset after reading): round trips are the script calls
# (EVALSHA/EVAL; moat's plain SET/DEL are not used by the stages measured here); the commands the scripts run
# inside Redis are listed after them. The readiness probe's PING is left out.
redis_calls() { # messages
    local stats
    stats=$(redis-cli -p "$REDIS_PORT" info commandstats | tr -d '\r')
    redis-cli -p "$REDIS_PORT" config resetstat >/dev/null
    echo "$stats" | awk -F'[:=,]' -v n="$1" '/^cmdstat_/ {
        sub(/^cmdstat_/, "", $1)
        if ($1 ~ /^(info|config|ping)/) next
        if ($1 == "evalsha" || $1 == "eval") rt += $3; else list = list sprintf(" %s=%d", $1, $3) }
        END { printf "    redis: %d round trips for %d messages (%.2f per message); inside the scripts:%s\n", rt, n, rt / n, list }'
}

# run LABEL PORT COUNT SIZE SESSIONS EXTRA_FLAGS -> sets R_WALL R_MOAT_CPU R_SINK_CPU
run() {
    local port=$2 count=$3 size=$4 sessions=$5 flags=$6 t0 t1 m0=0 m1=0 s0 s1 rc=0
    s0=$(cpu_ticks "$SINK_PID")
    [ -n "$MOAT_PID" ] && m0=$(cpu_ticks "$MOAT_PID")
    t0=$(now)
    # shellcheck disable=SC2086
    timeout 900 "${PEERS_CPU[@]}" "$SMTP_SOURCE" -4 $flags -s "$sessions" -m "$count" -l "$size" -M bench.example \
        -f sender@bench.example -t rcpt@sink.example "127.0.0.1:$port" >"$WORK/source.log" 2>&1 || rc=$?
    t1=$(now)
    s1=$(cpu_ticks "$SINK_PID")
    [ -n "$MOAT_PID" ] && m1=$(cpu_ticks "$MOAT_PID")
    if [ "$rc" != 0 ]; then
        echo "bench: smtp-source ($1) failed with status $rc:" >&2
        tail -n 5 "$WORK/source.log" >&2
        [ -n "$MOAT_PID" ] && tail -n 20 "$WORK/moat.log" >&2
        exit 1
    fi
    R_WALL=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
    R_MOAT_CPU=$(awk -v a="$m0" -v b="$m1" -v hz="$HZ" 'BEGIN { printf "%.2f", (b - a) / hz }')
    R_SINK_CPU=$(awk -v a="$s0" -v b="$s1" -v hz="$HZ" 'BEGIN { printf "%.2f", (b - a) / hz }')
}

printf '%-44s %-6s %6s %8s %9s %8s %7s %9s %11s %9s\n' \
    shape path msgs wall_s msgs/s MiB/s ratio moat_cpu msgs/cpu_s sink_cpu
report() { # shape path count size wall moat_cpu sink_cpu ratio
    awk -v shape="$1" -v path="$2" -v n="$3" -v size="$4" -v wall="$5" -v mc="$6" -v sc="$7" -v ratio="$8" 'BEGIN {
        rate = n / wall; mib = n * size / wall / 1048576
        per = (mc > 0) ? sprintf("%.0f", n / mc) : "-"
        mcs = (path == "moat") ? sprintf("%.2f", mc) : "-"
        printf "%-44s %-6s %6d %8.2f %9.1f %8.2f %7s %9s %11s %9.2f\n", shape, path, n, wall, rate, mib, ratio, mcs, per, sc
    }'
}

shape() { # label count size sessions flags
    local label=$1 count=$(($2 / DIV)) size=$3 sessions=$4 flags=$5 d_wall ratio="-"
    run "$label direct" "$SINK_PORT" "$count" "$size" "$sessions" "$flags"
    d_wall=$R_WALL
    report "$label" direct "$count" "$size" "$R_WALL" 0 "$R_SINK_CPU" "-"
    if [ -n "$MOAT_PID" ]; then
        run "$label moat" "$MOAT_PORT" "$count" "$size" "$sessions" "$flags"
        # Throughput ratio moat/direct (1.00 = as fast as without moat).
        ratio=$(awk -v d="$d_wall" -v m="$R_WALL" 'BEGIN { printf "%.2f", d / m }')
        report "$label" moat "$count" "$size" "$R_WALL" "$R_MOAT_CPU" "$R_SINK_CPU" "$ratio"
        [ -n "$REDIS_PID" ] && redis_calls "$count"
        kill -0 "$MOAT_PID" 2>/dev/null || die "moat died; log: $(tail -n 20 "$WORK/moat.log")"
    fi
}

if [ -n "$MOAT_PID" ]; then
    # Measured first, on a fresh process, so memory freed by the load runs does not hide the cost.
    idle_mem "$IDLE_CONNS" >"$WORK/idle.txt"
    [ -n "$REDIS_PID" ] && redis-cli -p "$REDIS_PORT" config resetstat >/dev/null
fi

wanted() { case " $SHAPES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
wanted a && shape "a: 10KiB, 20 sessions, new conn per msg" 5000 10240 20 ""
wanted b && shape "b: 10KiB, 20 sessions, reused conns (-d)" 5000 10240 20 "-d"
wanted c && shape "c: 1MiB, 4 sessions, new conn per msg" 500 1048576 4 ""

echo
if [ -n "$MOAT_PID" ]; then
    echo "moat peak RSS (VmHWM): $(status_kb "$MOAT_PID" VmHWM) kB; now (VmRSS): $(status_kb "$MOAT_PID" VmRSS) kB"
    cat "$WORK/idle.txt"
    echo "moat log: $(grep -ciE '(warn|error)' "$WORK/moat.log" || true) warning/error lines of $(wc -l <"$WORK/moat.log")"
else
    echo "moat not measured (--direct-only)"
fi
echo "ratio = moat msgs/s / direct msgs/s; CPU in seconds of utime+stime over the run (CLK_TCK=$HZ)"
