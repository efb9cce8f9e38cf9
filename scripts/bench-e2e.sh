#!/usr/bin/env bash
# End-to-end load benchmark on loopback: smtp-source -> moat -> smtp-sink, against smtp-source -> smtp-sink
# directly, in one run, for three shapes:
#   a) 5000 messages x 10 KiB, 20 sessions, a new connection per message
#   b) the same, with connections reused (smtp-source -d: "don't disconnect after sending a message")
#   c) 500 messages x 1 MiB, 4 sessions, a new connection per message
#   p) 2000 messages x 10 KiB, 4 sessions, reused connections, the client pipelining MAIL+RCPT+DATA
#      (scripts/bench-pipelining-client.py: smtp-source never pipelines, real MTAs do)
# Each shape runs direct, through moat without rules and through moat with the shipped rules (two moat
# processes, started side by side), unpinned and pinned (BENCH_PIN), all in one run. For each: msgs/s,
# moat/direct throughput ratio, and the CPU per message (from /proc/PID/stat utime+stime) of moat and of
# smtp-sink in the same run, and their ratio (moat_cpu/sink_cpu: below 1 means moat spends less CPU per
# message than the sink it feeds). Then moat's peak RSS (VmHWM) and the memory one idle client connection
# costs (RSS delta over N idle connections that got their greeting, divided by N).
#
#   scripts/bench-e2e.sh                  (needs target/release/moat: cargo build --release)
#   scripts/bench-e2e.sh --direct-only    only the smtp-source -> smtp-sink half
# Environment: MOAT_BIN (default target/release/moat), BENCH_QUICK=1 (a tenth of the messages),
#              BENCH_SCALE=N (N times the messages: CPU is read in 10 ms ticks, so on a fast machine a
#              shape of 5,000 small messages is only a few dozen ticks of moat's CPU),
#              IDLE_CONNS (default 2000, at most 4000), BENCH_REVERSE_DNS=true (moat looks up 127.0.0.1),
#              BENCH_SHAPES="a b c" (which shapes to run), BENCH_RULES="off on" (which moat variants),
#              BENCH_BASE=/path/to/other/moat: a third variant, that binary without rules, run right after
#              "off" each time (before/after comparisons on a busy machine: interleaved, same conditions),
#              BENCH_REPEAT=N (default 1): every shape N times, BENCH_CONFIG (default config/moat.toml),
#              BENCH_STATE=redis: every moat variant keeps its state in a redis-server started on a free
#              loopback port (docs/fleet.md); the Redis commands of the whole run are printed at the end,
#              BENCH_PIN="0 1" (default: both): 1 = smtp-source and smtp-sink share CPU 0 and moat gets
#              CPU 1 (taskset, moved per run with taskset -a -p). On a 2-core
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
SHAPES=${BENCH_SHAPES:-a b c p}
PINS=${BENCH_PIN:-0 1}
VARIANTS=${BENCH_RULES:-off on}
REPEAT=${BENCH_REPEAT:-1}
IDLE_CONNS=${IDLE_CONNS:-2000}
[ "$IDLE_CONNS" -ge 0 ] && [ "$IDLE_CONNS" -le 4000 ] || { echo "bench: IDLE_CONNS must be 0..4000" >&2; exit 2; }
DIRECT_ONLY=0
[ "${1:-}" = "--direct-only" ] && DIRECT_ONLY=1
[ "$DIRECT_ONLY" = 1 ] && VARIANTS=""
if [ -n "${BENCH_BASE:-}" ] && [ "$DIRECT_ONLY" = 0 ]; then
    [ -x "$BENCH_BASE" ] || { echo "bench: BENCH_BASE=$BENCH_BASE is not executable" >&2; exit 1; }
    VARIANTS=$(echo "$VARIANTS" | sed 's/\boff\b/off base/')
    case " $VARIANTS " in *" base "*) ;; *) VARIANTS="$VARIANTS base" ;; esac
fi
case " $PINS " in *" 1 "*) command -v taskset >/dev/null || { echo "bench: BENCH_PIN=1 needs taskset" >&2; exit 1; } ;; esac
SMTP_SOURCE=$(command -v smtp-source || echo /usr/sbin/smtp-source)
SMTP_SINK=$(command -v smtp-sink || echo /usr/sbin/smtp-sink)
PY=$(command -v python3) || { echo "bench: python3 is required" >&2; exit 1; }
HZ=$(getconf CLK_TCK)
DIV=1
[ "${BENCH_QUICK:-}" = 1 ] && DIV=10
SCALE=${BENCH_SCALE:-1}
[ "$SCALE" -ge 1 ] && [ "$SCALE" -le 20 ] || { echo "bench: BENCH_SCALE must be 1..20" >&2; exit 2; }

die() { echo "bench: $*" >&2; exit 1; }
if [ ! -x "$SMTP_SOURCE" ] || [ ! -x "$SMTP_SINK" ]; then die "smtp-source/smtp-sink not found (apt-get install postfix)"; fi
if [ "$DIRECT_ONLY" = 0 ] && [ ! -x "$MOAT_BIN" ]; then
    die "$MOAT_BIN not found: run 'cargo build --release' first (or use --direct-only)"
fi

WORK=$(mktemp -d /tmp/moat-bench.XXXXXX)
SINK_PID=""
IDLE_PID=""
declare -A MOAT_PID MOAT_PORT
REDIS_PID=""
cleanup() {
    # shellcheck disable=SC2086 # empty ones vanish
    stop_pids $IDLE_PID ${MOAT_PID[@]+"${MOAT_PID[@]}"} $SINK_PID $REDIS_PID
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Many short connections need file descriptors (moat holds two per relayed session).
ulimit -n 16384 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# utime+stime of PID (all its threads) in clock ticks (fields 14 and 15 of /proc/PID/stat, after "(comm)").
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

# pin MODE: 1 = smtp-sink (and later smtp-source) on CPU 0, every moat on CPU 1; 0 = everything on all CPUs.
PEERS_CPU=()
pin() {
    local all p
    all="0-$(($(nproc) - 1))"
    if [ "$1" = 1 ]; then
        PEERS_CPU=(taskset -c 0)
        taskset -a -p -c 0 "$SINK_PID" >/dev/null
        for p in ${MOAT_PID[@]+"${MOAT_PID[@]}"}; do taskset -a -p -c 1 "$p" >/dev/null; done
    else
        PEERS_CPU=()
        command -v taskset >/dev/null || return 0
        taskset -a -p -c "$all" "$SINK_PID" >/dev/null
        for p in ${MOAT_PID[@]+"${MOAT_PID[@]}"}; do taskset -a -p -c "$all" "$p" >/dev/null; done
    fi
}

# ---------------------------------------------------------------- smtp-sink
SINK_PORT=$(free_port)
# -u: smtp-sink must drop root after binding; -m: simultaneous connections (default 256); backlog 1024.
# smtp-sink announces PIPELINING, 8BITMIME, XCLIENT, etc.; it throws every message away.
if [ "$(id -u)" = 0 ]; then SINK_USER=(-u nobody); else SINK_USER=(); fi
"$SMTP_SINK" "${SINK_USER[@]}" -m 4096 -t 100 "127.0.0.1:$SINK_PORT" 1024 >"$WORK/sink.log" 2>&1 &
SINK_PID=$!
wait_listening "$SINK_PORT" "$SINK_PID" smtp-sink

# ---------------------------------------------------------------- moat
# start_moat VARIANT: off = no rule files, on = the shipped rules, base = BENCH_BASE without rules. Each is
# a copy of config/moat.toml with the shipped listeners replaced by one plain listener on a free port,
# upstream = smtp-sink without client identity, metrics off, connection limits above IDLE_CONNS.
STATE_KEYS=()
if [ "${BENCH_STATE:-memory}" = redis ]; then
    command -v redis-server >/dev/null || die "BENCH_STATE=redis needs redis-server"
    REDIS_PORT=$(free_port)
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no >"$WORK/redis.log" 2>&1 &
    REDIS_PID=$!
    wait_listening "$REDIS_PORT" "$REDIS_PID" redis-server
    STATE_KEYS=('state.backend="redis"' "state.url=\"redis://127.0.0.1:$REDIS_PORT/0\"")
fi
start_moat() {
    local v=$1 port bin=$MOAT_BIN rules=()
    port=$(free_port)
    [ "$v" = on ] || rules=('rules.directory=""')
    rules+=(${STATE_KEYS[@]+"${STATE_KEYS[@]}"})
    [ "$v" = base ] && bin=$BENCH_BASE
    "$PY" "$ROOT/scripts/bench-config.py" "$CONFIG_SRC" "$WORK/moat-$v.toml" "$port" \
        "upstream.address=\"127.0.0.1:$SINK_PORT\"" 'upstream.identity="none"' 'metrics.address=""' \
        "server.reverse_dns=${BENCH_REVERSE_DNS:-false}" "limits.max_connections=$((IDLE_CONNS + 1000))" \
        "limits.max_connections_per_ip=$((IDLE_CONNS + 1000))" 'relay.local_domains=["sink.example"]' \
        ${rules[@]+"${rules[@]}"}
    if [ "$v" = base ]; then
        # An older binary does not know keys added since: drop each line it calls an unknown field (the
        # key then has its default in the older binary, which is what it always did).
        local tries out line
        for tries in 1 2 3 4 5 6 7 8 9 10; do
            out=$("$bin" check --config "$WORK/moat-$v.toml" 2>&1) && break
            line=$(echo "$out" | sed -n "s|^ *$WORK/moat-$v.toml:\([0-9]*\): unknown field.*|\1|p" | head -n 1)
            [ -n "$line" ] || break
            sed -i "${line}d" "$WORK/moat-$v.toml"
        done
    fi
    "$bin" check --config "$WORK/moat-$v.toml" >/dev/null || die "moat check rejects $WORK/moat-$v.toml"
    "$bin" serve --config "$WORK/moat-$v.toml" >"$WORK/moat-$v.log" 2>&1 &
    MOAT_PID[$v]=$!
    MOAT_PORT[$v]=$port
    wait_listening "$port" "${MOAT_PID[$v]}" "moat ($v)"
}
for v in $VARIANTS; do start_moat "$v"; done

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

idle_mem() { # PID PORT N -> prints one line
    local pid=$1 port=$2 n=$3 before after ready=""
    rm -f "$WORK/idle.ready" "$WORK/idle.stop"
    before=$(status_kb "$pid" VmRSS)
    "$PY" "$WORK/idle.py" "$port" "$n" "$WORK/idle.ready" "$WORK/idle.stop" 2>"$WORK/idle.err" &
    IDLE_PID=$!
    for _ in $(seq 1 900); do
        [ -s "$WORK/idle.ready" ] && break
        kill -0 "$IDLE_PID" 2>/dev/null || break
        sleep 0.1
    done
    [ -s "$WORK/idle.ready" ] && ready=$(cat "$WORK/idle.ready")
    sleep 1
    after=$(status_kb "$pid" VmRSS)
    touch "$WORK/idle.stop"
    wait "$IDLE_PID" 2>/dev/null || true
    IDLE_PID=""
    if [ "${ready:-0}" -gt 0 ]; then
        awk -v b="$before" -v a="$after" -v n="$ready" -v want="$n" 'BEGIN {
            printf "idle plaintext connections: %d of %d greeted; moat RSS %d kB -> %d kB: %.1f KiB per idle connection\n",
                n, want, b, a, (a - b) / n }'
    else
        echo "idle connections: none greeted: $(head -c 300 "$WORK/idle.err")"
    fi
}

# ---------------------------------------------------------------- runs
# run LABEL PORT COUNT SIZE SESSIONS FLAGS [MOAT_PID] -> sets R_WALL R_MOAT_CPU R_SINK_CPU (CPU-seconds)
run() {
    local port=$2 count=$3 size=$4 sessions=$5 flags=$6 mpid=${7:-} t0 t1 m0=0 m1=0 s0 s1 rc=0
    s0=$(cpu_ticks "$SINK_PID")
    [ -n "$mpid" ] && m0=$(cpu_ticks "$mpid")
    t0=$(now)
    if [ "$flags" = pipelining ]; then
        timeout 900 ${PEERS_CPU[@]+"${PEERS_CPU[@]}"} "$PY" "$ROOT/scripts/bench-pipelining-client.py" 127.0.0.1 "$port" \
            "$sessions" "$count" "$size" 1 >"$WORK/source.log" 2>&1 || rc=$?
    else
        # shellcheck disable=SC2086
        timeout 900 ${PEERS_CPU[@]+"${PEERS_CPU[@]}"} "$SMTP_SOURCE" -4 $flags -s "$sessions" -m "$count" -l "$size" \
            -M bench.example -f sender@bench.example -t rcpt@sink.example "127.0.0.1:$port" >"$WORK/source.log" 2>&1 || rc=$?
    fi
    t1=$(now)
    s1=$(cpu_ticks "$SINK_PID")
    [ -n "$mpid" ] && m1=$(cpu_ticks "$mpid")
    if [ "$rc" != 0 ]; then
        echo "bench: smtp-source ($1) failed with status $rc:" >&2
        tail -n 5 "$WORK/source.log" >&2
        exit 1
    fi
    R_WALL=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
    R_MOAT_CPU=$(awk -v a="$m0" -v b="$m1" -v hz="$HZ" 'BEGIN { printf "%.2f", (b - a) / hz }')
    R_SINK_CPU=$(awk -v a="$s0" -v b="$s1" -v hz="$HZ" 'BEGIN { printf "%.2f", (b - a) / hz }')
}

printf '%-4s %-3s %-8s %6s %8s %9s %7s %12s %12s %9s\n' \
    shape pin path msgs wall_s msgs/s thru moat_us/msg sink_us/msg moat/sink
report() { # shape pin path count wall moat_cpu sink_cpu thru
    awk -v shape="$1" -v pin="$2" -v path="$3" -v n="$4" -v wall="$5" -v mc="$6" -v sc="$7" -v thru="$8" 'BEGIN {
        mus = (path == "direct") ? "-" : sprintf("%.0f", mc * 1e6 / n)
        sus = sprintf("%.0f", sc * 1e6 / n)
        ratio = (path == "direct" || sc <= 0) ? "-" : sprintf("%.2f", mc / sc)
        printf "%-4s %-3s %-8s %6d %8.2f %9.1f %7s %12s %12s %9s\n", shape, pin, path, n, wall, n / wall, thru, mus, sus, ratio
    }' | tee -a "$WORK/results.txt"
}

shape() { # key count size sessions flags pin
    local key=$1 count=$(($2 * SCALE / DIV)) size=$3 sessions=$4 flags=$5 p=$6 d_wall v thru
    run "$key direct" "$SINK_PORT" "$count" "$size" "$sessions" "$flags"
    d_wall=$R_WALL
    report "$key" "$p" direct "$count" "$R_WALL" 0 "$R_SINK_CPU" "-"
    for v in $VARIANTS; do
        run "$key moat-$v" "${MOAT_PORT[$v]}" "$count" "$size" "$sessions" "$flags" "${MOAT_PID[$v]}"
        # Throughput ratio moat/direct (1.00 = as fast as without moat).
        thru=$(awk -v d="$d_wall" -v m="$R_WALL" 'BEGIN { printf "%.2f", d / m }')
        report "$key" "$p" "$(case $v in base) echo base-off ;; *) echo "moat-$v" ;; esac)" "$count" "$R_WALL" "$R_MOAT_CPU" "$R_SINK_CPU" "$thru"
        kill -0 "${MOAT_PID[$v]}" 2>/dev/null || die "moat ($v) died; log: $(tail -n 20 "$WORK/moat-$v.log")"
    done
}

IDLE_LINE=""
if [ -n "$VARIANTS" ] && [ "$IDLE_CONNS" -gt 0 ]; then
    # Measured first, on a fresh process, so memory freed by the load runs does not hide the cost.
    first=${VARIANTS%% *}
    IDLE_LINE=$(idle_mem "${MOAT_PID[$first]}" "${MOAT_PORT[$first]}" "$IDLE_CONNS")
fi

wanted() { case " $SHAPES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
for _ in $(seq 1 "$REPEAT"); do
    for p in $PINS; do
        pin "$p"
        wanted a && shape a 5000 10240 20 "" "$p"
        wanted b && shape b 5000 10240 20 "-d" "$p"
        wanted c && shape c 500 1048576 4 "" "$p"
        wanted p && shape p 2000 10240 4 pipelining "$p"
    done
done

echo
echo "shapes: a = 10 KiB, 20 sessions, new connection per message; b = the same over reused connections (-d);"
echo "        c = 1 MiB, 4 sessions, new connection per message; p = 10 KiB, 4 reused sessions, pipelining client."
echo "pin 1 = source+sink on CPU 0, moat on CPU 1."
echo "thru = msgs/s through moat / msgs/s direct; moat/sink = moat's CPU per message / smtp-sink's (same run)."
if [ -n "$REPEAT" ] && [ "$REPEAT" -gt 1 ]; then
    echo
    echo "medians of moat/sink over $REPEAT repetitions:"
    awk '$3 != "direct" && $10 != "-" { print $1 " pin" $2 " " $3, $10 }' "$WORK/results.txt" | sort -k1,3 -k4n |
        awk '{ k = $1 " " $2 " " $3; if (k != last && last != "") flush(); last = k; v[++n] = $4 }
            function flush() { printf "  %-22s %s  (all: ", last, v[int((n + 1) / 2)]; for (i = 1; i <= n; i++) printf "%s%s", v[i], (i < n ? " " : ")\n"); n = 0 }
            END { if (n) flush() }'
fi
echo
for v in $VARIANTS; do
    echo "moat ($v) peak RSS (VmHWM): $(status_kb "${MOAT_PID[$v]}" VmHWM) kB; now (VmRSS): $(status_kb "${MOAT_PID[$v]}" VmRSS) kB;" \
        "log: $(grep -ciE '(warn|error)' "$WORK/moat-$v.log" || true) warning/error lines of $(wc -l <"$WORK/moat-$v.log")"
done
[ -n "$IDLE_LINE" ] && echo "$IDLE_LINE"
echo "CPU in seconds of utime+stime over each run (CLK_TCK=$HZ), per message in microseconds"
if [ -n "$REDIS_PID" ]; then
    echo "Redis commands over the whole run (INFO commandstats; evalsha = one script round trip):"
    redis-cli -p "$REDIS_PORT" info commandstats | tr -d '\r' | grep '^cmdstat_' | sed 's/^/  /'
fi
