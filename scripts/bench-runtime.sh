#!/usr/bin/env bash
# The two runtimes side by side: server.thread_per_core = false (one work-stealing tokio runtime, the
# default) against true (a current-thread runtime and a SO_REUSEPORT socket per core, src/cores.rs).
# smtp-source -> moat -> smtp-sink on loopback, rules off; for each shape and mode, alternating, REPEAT
# times: perf's software counters on moat and on smtp-sink over the measured messages (task-clock in ns,
# so no 10 ms ticks; context switches; CPU migrations), per message, and msgs/s. Prints every run and the
# medians per shape and mode.
#
#   cargo build --release && scripts/bench-runtime.sh
# Environment: MOAT_BIN (default target/release/moat), RUNTIME_MSGS (default 20000, at most 200000),
#              RUNTIME_REPEAT (default 3), RUNTIME_SHAPES (default "a b": a = 10 KiB, 20 sessions, a new
#              connection per message; b = the same over reused connections).
# Needs perf (Debian's linux-perf; software events only, so it works on VMs without hardware counters).
# Everything runs on 127.0.0.1; every process this script starts is killed on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/bench-lib.sh
. "$ROOT/scripts/bench-lib.sh"
die() { echo "bench-runtime: $*" >&2; exit 1; }
MOAT_BIN=${MOAT_BIN:-$ROOT/target/release/moat}
MSGS=${RUNTIME_MSGS:-20000}
REPEAT=${RUNTIME_REPEAT:-3}
SHAPES=${RUNTIME_SHAPES:-a b}
[ "$MSGS" -ge 100 ] && [ "$MSGS" -le 200000 ] || die "RUNTIME_MSGS must be 100..200000"
[ "$REPEAT" -ge 1 ] && [ "$REPEAT" -le 20 ] || die "RUNTIME_REPEAT must be 1..20"
PY=$(command -v python3) || die "python3 is required"
PERF=$(command -v perf) || die "perf is required (apt-get install linux-perf)"
SMTP_SOURCE=$(command -v smtp-source || echo /usr/sbin/smtp-source)
SMTP_SINK=$(command -v smtp-sink || echo /usr/sbin/smtp-sink)
[ -x "$SMTP_SOURCE" ] && [ -x "$SMTP_SINK" ] || die "smtp-source/smtp-sink not found (apt-get install postfix)"
[ -x "$MOAT_BIN" ] || die "$MOAT_BIN not found (cargo build --release)"

WORK=$(mktemp -d)
PIDS=()
cleanup() { stop_pids ${PIDS[@]+"${PIDS[@]}"}; rm -rf "$WORK"; }
trap cleanup EXIT

if [ "$(id -u)" = 0 ]; then SINK_USER=(-u nobody); else SINK_USER=(); fi
SINK_PORT=$(free_port)
"$SMTP_SINK" "${SINK_USER[@]}" -m 4096 -t 100 "127.0.0.1:$SINK_PORT" 1024 >"$WORK/sink.log" 2>&1 &
SINK_PID=$!
PIDS+=("$SINK_PID")
wait_listening "$SINK_PORT" "$SINK_PID" smtp-sink

declare -A PORT PID
for mode in false true; do
    PORT[$mode]=$(free_port)
    "$PY" "$ROOT/scripts/bench-config.py" "$ROOT/config/moat.toml" "$WORK/moat-$mode.toml" "${PORT[$mode]}" \
        "upstream.address=\"127.0.0.1:$SINK_PORT\"" 'upstream.identity="none"' 'metrics.address=""' \
        'server.reverse_dns=false' 'limits.max_connections=3000' 'limits.max_connections_per_ip=3000' \
        'relay.local_domains=["sink.example"]' 'rules.directory=""' "server.thread_per_core=$mode"
    "$MOAT_BIN" serve --config "$WORK/moat-$mode.toml" >"$WORK/moat-$mode.log" 2>&1 &
    PID[$mode]=$!
    PIDS+=("${PID[$mode]}")
    wait_listening "${PORT[$mode]}" "${PID[$mode]}" "moat (thread_per_core=$mode)"
done

# source PORT COUNT FLAGS
source_run() {
    local flags=()
    [ "$3" = b ] && flags=(-d)
    "$SMTP_SOURCE" ${flags[@]+"${flags[@]}"} -s 20 -m "$2" -l 10240 -f a@example.org -t b@sink.example \
        "127.0.0.1:$1" >>"$WORK/source.log" 2>&1
}

# counter FILE NAME: the value of one perf counter (task-clock in ms)
counter() { awk -v want="$2" '$2 == want || $3 == want { gsub(",", "", $1); print $1; exit }' "$1"; }

printf '%-5s %-15s %10s %10s %9s %11s %14s %8s\n' shape thread_per_core moat_us sink_us moat/sink \
    "cs/msg" "migrations/msg" "msgs/s" | tee "$WORK/runs.txt"
for _ in $(seq 1 "$REPEAT"); do
    for shape in $SHAPES; do
        for mode in false true; do
            source_run "${PORT[$mode]}" 1000 "$shape" # warm-up: pool, buffers, first registrations
            "$PERF" stat -x' ' -e task-clock,context-switches,cpu-migrations -p "${PID[$mode]}" -o "$WORK/perf-moat" &
            pm=$!
            "$PERF" stat -x' ' -e task-clock -p "$SINK_PID" -o "$WORK/perf-sink" &
            ps=$!
            sleep 0.3
            t0=$(date +%s.%N)
            source_run "${PORT[$mode]}" "$MSGS" "$shape"
            t1=$(date +%s.%N)
            kill -INT "$pm" "$ps"
            wait "$pm" "$ps" 2>/dev/null || true
            awk -v s="$shape" -v m="$mode" -v n="$MSGS" -v w="$(echo "$t1 - $t0" | bc)" \
                -v mt="$(counter "$WORK/perf-moat" task-clock)" -v st="$(counter "$WORK/perf-sink" task-clock)" \
                -v cs="$(counter "$WORK/perf-moat" context-switches)" \
                -v mg="$(counter "$WORK/perf-moat" cpu-migrations)" 'BEGIN {
                    printf "%-5s %-15s %10.1f %10.1f %9.2f %11.2f %14.3f %8.0f\n", s, m, mt * 1000 / n,
                        st * 1000 / n, mt / st, cs / n, mg / n, n / w }' | tee -a "$WORK/runs.txt"
            kill -0 "${PID[$mode]}" 2>/dev/null || die "moat (thread_per_core=$mode) died: $(tail -n 20 "$WORK/moat-$mode.log")"
        done
    done
done

echo
echo "medians over $REPEAT runs of $MSGS messages (10 KiB, 20 sessions; a: new connection each, b: reused):"
for shape in $SHAPES; do
    for mode in false true; do
        awk -v s="$shape" -v m="$mode" '$1 == s && $2 == m' "$WORK/runs.txt" | "$PY" -c '
import statistics, sys
rows = [l.split() for l in sys.stdin]
cols = list(zip(*rows))
med = lambda i: statistics.median(float(x) for x in cols[i])
print(f"  {rows[0][0]}  thread_per_core={rows[0][1]:<5}  moat {med(2):6.1f} us  sink {med(3):6.1f} us  "
      f"moat/sink {med(4):.2f}  cs/msg {med(5):.2f}  migrations/msg {med(6):.3f}  {med(7):.0f} msgs/s")'
    done
done
