#!/usr/bin/env bash
# moat in front of a real Postfix (scripts/postfix-instance.sh), upstream.chunking on (BDAT) against off
# (DATA): system calls per message (strace -f -c over a fixed number of messages) and, with
# BENCH_CALLGRIND=1, user-space instructions per message (callgrind, two message counts, the difference
# divided by the extra messages so start-up cancels out). See docs/performance.md, "Upstream BDAT".
#
#   cargo build --release && scripts/bench-upstream-bdat.sh [MESSAGES] [SIZE]
#
# MESSAGES (default 400) messages of SIZE body bytes (default 10240) from smtp-source over one reused
# connection (-d), each to one recipient; rules off, Received header on, upstream pool on. Needs root
# (Postfix), smtp-source, strace (and valgrind for BENCH_CALLGRIND=1). Loopback only; bounded by MESSAGES.
set -euo pipefail

PY=${PY:-python3}
die() { echo "bench-upstream-bdat: $*" >&2; exit 1; }
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/bench-lib.sh
. "$root/scripts/bench-lib.sh"

N=${1:-400}
SIZE=${2:-10240}
bin=${MOAT_BIN:-$root/target/release/moat}
[ -x "$bin" ] || die "no $bin: cargo build --release first"
command -v smtp-source >/dev/null || die "smtp-source (Postfix) is missing"
command -v strace >/dev/null || die "strace is missing"

work=$(mktemp -d /tmp/bench-bdat.XXXXXX)
chmod 755 "$work" # the Postfix daemons must reach the instance below it
moat_pid=""
cleanup() {
    [ -n "$moat_pid" ] && stop_pids "$moat_pid"
    "$root/scripts/postfix-instance.sh" stop "$work/postfix" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
[ -n "${KEEP:-}" ] && trap - EXIT

pf_port=$(free_port)
# Deliveries to the Maildir are not what is measured: discard them, so the disk does not fill up.
"$root/scripts/postfix-instance.sh" start "$work/postfix" "$pf_port" "virtual_transport=discard:" >/dev/null

start_moat() { # chunking [wrapper...]
    local chunking=$1 port
    shift
    port=$(free_port)
    cat >"$work/moat.toml" <<EOF
server.hostname = "moat.bench"
server.reverse_dns = false
metrics.address = ""
audit.destination = "off"
rules.directory = ""
relay.local_domains = ["example.test"]
upstream.address = "127.0.0.1:$pf_port"
upstream.chunking = $chunking
shutdown.grace_period = "2s"
[[listener]]
name = "smtp"
address = "127.0.0.1:$port"
mode = "plain"
EOF
    RUST_LOG=warn "$@" "$bin" serve --config "$work/moat.toml" >"$work/moat.out" 2>&1 &
    moat_pid=$!
    wait_listening "$port" "$moat_pid" moat
    moat_port=$port
}

send() { # count
    smtp-source -d -s 1 -m "$1" -l "$SIZE" -f a@example.org -t b@example.test "127.0.0.1:$moat_port"
}

for chunking in true false; do
    start_moat "$chunking"
    send 20 # warm-up: pool, caches
    strace -f -c -q -o "$work/strace-$chunking" -p "$moat_pid" &
    strace_pid=$!
    sleep 1
    send "$N"
    sleep 0.5
    kill -INT "$strace_pid"
    wait "$strace_pid" || true
    # Wall time for the same messages without strace: one client, one connection, so each round trip
    # saved shows (noisy on a shared machine: compare runs, not digits).
    t0=$(date +%s%N)
    send "$N"
    t1=$(date +%s%N)
    stop_pids "$moat_pid"
    moat_pid=""
    echo "== upstream.chunking = $chunking: $N messages of $SIZE bytes in $(((t1 - t0) / 1000000)) ms;" \
        "system calls per message:"
    awk -v n="$N" '$NF ~ /^(sendto|recvfrom|write|writev|read|epoll_wait|futex|total)$/ {
        calls = $4; printf "  %-10s %6.2f\n", $NF, calls / n }' "$work/strace-$chunking"
done

if [ "${BENCH_CALLGRIND:-0}" = 1 ]; then
    command -v valgrind >/dev/null || die "valgrind is missing"
    small=$((N / 2))
    for chunking in true false; do
        for count in "$small" "$N"; do
            start_moat "$chunking" valgrind --tool=callgrind --callgrind-out-file="$work/cg-$chunking-$count" \
                --trace-children=no
            send "$count"
            # Callgrind writes its profile at exit: let moat drain and exit by itself.
            kill -TERM "$moat_pid"
            wait "$moat_pid" || true
            moat_pid=""
        done
        ir() { callgrind_annotate "$1" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }'; }
        a=$(ir "$work/cg-$chunking-$small")
        b=$(ir "$work/cg-$chunking-$N")
        echo "== upstream.chunking = $chunking: user-space instructions per message: $(((b - a) / (N - small)))"
    done
fi
