#!/usr/bin/env bash
# User-space instructions per relayed message, counted by callgrind: the figure that does not move with
# the machine's load, so before/after comparisons of one change are possible on a busy 2-core VM.
#
#   scripts/bench-callgrind.sh [MOAT_BIN]       (default target/release/moat: cargo build --release)
#
# moat runs under `valgrind --tool=callgrind --instr-atstart=no` in front of smtp-sink on a free
# loopback port. A warm-up of CG_WARM messages runs uncounted (start-up, first registrations, buffer
# growth), then instrumentation is switched on (callgrind_control -i on) for CG_MSGS messages from smtp-source
# and the counts dumped (callgrind_control -d) before moat is stopped: the steady state only, all threads
# together.
# Prints "instructions per message: N" and keeps the profile when CG_KEEP=DIR is set (callgrind_annotate
# DIR/callgrind.out.1 shows where they go).
# Environment: CG_MSGS (default 500), CG_WARM (50), CG_SIZE (10240 bytes), CG_SESSIONS (4),
#   CG_FLAGS (default "-d": reuse connections; "" for a new connection per message), CG_RULES=off|on (off:
#   no rule files; on: the shipped rules), CG_CONFIG (default config/moat.toml).
# Everything runs on 127.0.0.1; every process this script starts is stopped on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/bench-lib.sh
. "$ROOT/scripts/bench-lib.sh"
MOAT_BIN=$(readlink -f "${1:-$ROOT/target/release/moat}")
MSGS=${CG_MSGS:-500}
WARM=${CG_WARM:-50}
SIZE=${CG_SIZE:-10240}
SESSIONS=${CG_SESSIONS:-4}
FLAGS=${CG_FLAGS--d}
RULES=${CG_RULES:-off}
CONFIG_SRC=${CG_CONFIG:-$ROOT/config/moat.toml}
PY=$(command -v python3) || { echo "bench: python3 is required" >&2; exit 1; }
die() { echo "bench: $*" >&2; exit 1; }
SMTP_SOURCE=$(command -v smtp-source || echo /usr/sbin/smtp-source)
SMTP_SINK=$(command -v smtp-sink || echo /usr/sbin/smtp-sink)
[ -x "$SMTP_SOURCE" ] && [ -x "$SMTP_SINK" ] || die "smtp-source/smtp-sink not found (apt-get install postfix)"
command -v valgrind >/dev/null && command -v callgrind_control >/dev/null || die "needs valgrind (apt-get install valgrind)"
[ -x "$MOAT_BIN" ] || die "$MOAT_BIN not found: run 'cargo build --release' first"
[ "$MSGS" -ge 1 ] && [ "$MSGS" -le 100000 ] || die "CG_MSGS must be 1..100000"
case "$RULES" in off | on) ;; *) die "CG_RULES must be off or on" ;; esac

WORK=$(mktemp -d /tmp/moat-callgrind.XXXXXX)
SINK_PID="" MOAT_PID=""
cleanup() {
    # shellcheck disable=SC2086 # empty ones vanish
    stop_pids $MOAT_PID $SINK_PID
    if [ -n "${CG_KEEP:-}" ]; then mkdir -p "$CG_KEEP" && cp "$WORK"/callgrind.out* "$CG_KEEP"/ 2>/dev/null || true; fi
    [ -n "${CG_DEBUG:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

SINK_PORT=$(free_port)
if [ "$(id -u)" = 0 ]; then SINK_USER=(-u nobody); else SINK_USER=(); fi
"$SMTP_SINK" "${SINK_USER[@]}" -m 1024 -t 100 "127.0.0.1:$SINK_PORT" 1024 >"$WORK/sink.log" 2>&1 &
SINK_PID=$!
wait_listening "$SINK_PORT" "$SINK_PID" smtp-sink

PORT=$(free_port)
rules=()
[ "$RULES" = on ] || rules=('rules.directory=""')
"$PY" "$ROOT/scripts/bench-config.py" "$CONFIG_SRC" "$WORK/moat.toml" "$PORT" \
    "upstream.address=\"127.0.0.1:$SINK_PORT\"" 'upstream.identity="none"' 'metrics.address=""' \
    'server.reverse_dns=false' 'relay.local_domains=["sink.example"]' ${rules[@]+"${rules[@]}"}
# The shipped config names its rules directory relative to the repository: run from there.
cd "$ROOT"
"$MOAT_BIN" check --config "$WORK/moat.toml" >/dev/null || die "moat check rejects $WORK/moat.toml"
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$WORK/callgrind.out" \
    "$MOAT_BIN" serve --config "$WORK/moat.toml" >"$WORK/moat.log" 2>&1 &
MOAT_PID=$!
for _ in $(seq 1 600); do
    listening "$PORT" && break
    kill -0 "$MOAT_PID" 2>/dev/null || { cat "$WORK/moat.log" >&2; die "moat exited under valgrind"; }
    sleep 0.1
done
listening "$PORT" || die "moat did not listen within 60s under valgrind"

source_run() { # count
    # shellcheck disable=SC2086 # FLAGS is a word list
    timeout 600 "$SMTP_SOURCE" -4 $FLAGS -s "$SESSIONS" -m "$1" -l "$SIZE" -M bench.example -f sender@bench.example \
        -t rcpt@sink.example "127.0.0.1:$PORT" >"$WORK/source.log" 2>&1 ||
        { cat "$WORK/source.log" >&2; die "smtp-source failed"; }
}

source_run "$WARM"
callgrind_control -i on "$MOAT_PID" >"$WORK/cgc.log" 2>&1 || die "callgrind_control failed: $(cat "$WORK/cgc.log")"
source_run "$MSGS"
callgrind_control -d "$MOAT_PID" >>"$WORK/cgc.log" 2>&1 || die "callgrind_control -d failed: $(cat "$WORK/cgc.log")"
relayed=$(grep -c 'reply.code=250' "$WORK/moat.log" || true)
stop_pids "$MOAT_PID"
MOAT_PID=""
# The dump (callgrind.out.1) holds exactly the counted window; the file written at exit only the rest.
[ -f "$WORK/callgrind.out.1" ] || die "callgrind wrote no dump"
total=$(awk '/^totals:/ { print $2; exit }' "$WORK/callgrind.out.1")
total=${total:-0}
[ "$total" -gt 0 ] || die "callgrind wrote no counts"
echo "moat: $MOAT_BIN, rules $RULES, $MSGS messages of $SIZE bytes, $SESSIONS sessions, smtp-source flags '$FLAGS'"
echo "messages moat answered 250 (log, warm-up included): $relayed of $((WARM + MSGS))"
[ "$relayed" = $((WARM + MSGS)) ] || die "not every message was relayed: the count is not per relayed message"
echo "instructions: $total"
echo "instructions per message: $((total / MSGS))"
