#!/usr/bin/env bash
# moat's RSS while one large message streams through it: smtp-source -> moat (no rules) -> smtp-sink on
# loopback, VmRSS sampled every 50 ms (at most 1,200 samples) while the message is in flight; prints the RSS
# before, the highest sample and VmHWM. The spool keeps spool.memory_threshold in memory and spills the rest,
# so the peak should not grow with the message.
#
#   scripts/bench-stream-rss.sh            (needs target/release/moat)
# Environment: MOAT_BIN, STREAM_MIB (default 50, at most 1000).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/bench-lib.sh
. "$ROOT/scripts/bench-lib.sh"
PY=$(command -v python3) || { echo "bench: python3 is required" >&2; exit 1; }
die() { echo "bench: $*" >&2; exit 1; }
MOAT_BIN=${MOAT_BIN:-$ROOT/target/release/moat}
MIB=${STREAM_MIB:-50}
[ "$MIB" -ge 1 ] && [ "$MIB" -le 1000 ] || die "STREAM_MIB must be 1..1000"
[ -x "$MOAT_BIN" ] || die "$MOAT_BIN not found: cargo build --release"
WORK=$(mktemp -d /tmp/moat-rss.XXXXXX)
PIDS=()
cleanup() { stop_pids ${PIDS[@]+"${PIDS[@]}"}; rm -rf "$WORK"; }
trap cleanup EXIT
SP=$(free_port)
MP=$(free_port)
if [ "$(id -u)" = 0 ]; then SINK_USER=(-u nobody); else SINK_USER=(); fi
smtp-sink "${SINK_USER[@]}" -m 16 -t 300 "127.0.0.1:$SP" 16 >/dev/null 2>&1 &
PIDS+=($!)
wait_listening "$SP" "${PIDS[0]}" smtp-sink
"$PY" "$ROOT/scripts/bench-config.py" "$ROOT/config/moat.toml" "$WORK/moat.toml" "$MP" \
    "upstream.address=\"127.0.0.1:$SP\"" 'upstream.identity="none"' 'metrics.address=""' \
    'server.reverse_dns=false' 'relay.local_domains=["sink.example"]' 'rules.directory=""' \
    "limits.max_message_size=\"$((MIB + 10))MiB\""
"$MOAT_BIN" serve --config "$WORK/moat.toml" >"$WORK/moat.log" 2>&1 &
MOAT=$!
PIDS+=("$MOAT")
wait_listening "$MP" "$MOAT" moat
rss() { awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"; }
before=$(rss "$MOAT" VmRSS)
timeout 600 smtp-source -4 -s 1 -m 1 -l $((MIB * 1048576)) -M bench.example -f s@bench.example \
    -t r@sink.example "127.0.0.1:$MP" >"$WORK/source.log" 2>&1 &
SRC=$!
PIDS+=("$SRC")
max=$before n=0
while kill -0 "$SRC" 2>/dev/null && [ "$n" -lt 1200 ]; do
    r=$(rss "$MOAT" VmRSS)
    [ "$r" -gt "$max" ] && max=$r
    n=$((n + 1))
    sleep 0.05
done
wait "$SRC" || die "smtp-source failed: $(tail -n 3 "$WORK/source.log")"
grep -q 'verdict="accepted"' "$WORK/moat.log" || die "the message was not relayed: $(tail -n 3 "$WORK/moat.log")"
echo "one ${MIB} MiB message through moat: VmRSS ${before} kB before, at most ${max} kB while streaming" \
    "(${n} samples), VmHWM $(rss "$MOAT" VmHWM) kB"
