#!/usr/bin/env bash
# Redis memory per tracked key, measured: starts a throwaway redis-server on a free loopback port (no
# persistence), and for each kind of key moat's Redis store writes (src/state/redis.rs) inserts N keys in
# exactly that store's format and lifetime, reading INFO memory (used_memory) before and after:
#   rate    GCRA state      SET moat:rl:ip:<IPv4>            "t:<expires ms>:<TAT ms>"   PX
#   lease   connection      ZADD moat:conn:<IPv4> <expires> <connection id> + PEXPIRE (one holder)
#   counter fixed window    SET moat:auth:fail:<IPv4>        "c:<expires ms>:<n>"        PX
#   value   TOTP step used  SET moat:totp:<user>:<step>      "v:<expires ms>:"           PX
# Keys are written with redis-cli --pipe (mass insertion), which is what makes a million quick; the bytes
# stored are the same as the store's scripts write.
#
#   scripts/bench-redis-memory.sh            N = 1000000 per kind
#   N=100000 scripts/bench-redis-memory.sh
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=$(command -v python3) || { echo "bench: python3 is required" >&2; exit 1; }
die() { echo "bench: $*" >&2; exit 1; }
# shellcheck source=scripts/bench-lib.sh
. "$ROOT/scripts/bench-lib.sh"
command -v redis-server >/dev/null || die "redis-server not found (apt-get install redis-server)"
N=${N:-1000000}
WORK=$(mktemp -d /tmp/moat-redis-mem.XXXXXX)
REDIS_PID=""
cleanup() {
    # shellcheck disable=SC2086
    stop_pids $REDIS_PID
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

PORT=$(free_port)
redis-server --port "$PORT" --bind 127.0.0.1 --save '' --appendonly no >"$WORK/redis.log" 2>&1 &
REDIS_PID=$!
wait_listening "$PORT" "$REDIS_PID" redis-server
cli() { redis-cli -p "$PORT" "$@"; }

used() { cli info memory | tr -d '\r' | awk -F: '$1 == "used_memory" { print $2 }'; }

# gen KIND N -> RESP commands on stdout
gen() {
    "$PY" - "$1" "$2" <<'PYEOF'
import sys, time
kind, n = sys.argv[1], int(sys.argv[2])
now = int(time.time() * 1000)
ttl = 3_600_000
exp = now + ttl
out = sys.stdout.buffer
def cmd(*args):
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(a), a))
    out.write(b"".join(parts))
for i in range(n):
    ip = f"{10 + (i >> 24) % 200}.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
    if kind == "rate":
        cmd("SET", f"moat:rl:ip:{ip}", f"t:{exp}:{exp - 6000}", "PX", ttl)
    elif kind == "lease":
        cmd("ZADD", f"moat:conn:{ip}", exp, f"K7QW2M-6750A1B2-{i:06X}")
        cmd("PEXPIRE", f"moat:conn:{ip}", ttl)
    elif kind == "counter":
        cmd("SET", f"moat:auth:fail:{ip}", f"c:{exp}:3", "PX", ttl)
    elif kind == "value":
        cmd("SET", f"moat:totp:user{i}@example.com:{58_000_000 + i % 3}", f"v:{exp}:", "PX", ttl)
PYEOF
}

printf '%-8s %10s %14s %14s %12s %16s\n' kind keys before_bytes after_bytes bytes/key MiB/million_keys
for kind in rate lease counter value; do
    cli flushall >/dev/null
    before=$(used)
    gen "$kind" "$N" >"$WORK/$kind.resp"
    cli --pipe <"$WORK/$kind.resp" >"$WORK/$kind.pipe.log" 2>&1 || die "redis-cli --pipe failed: $(tail -n 3 "$WORK/$kind.pipe.log")"
    rm -f "$WORK/$kind.resp"
    keys=$(cli dbsize | tr -d '\r')
    after=$(used)
    awk -v k="$kind" -v n="$keys" -v b="$before" -v a="$after" 'BEGIN {
        printf "%-8s %10d %14d %14d %12.1f %16.1f\n", k, n, b, a, (a - b) / n, (a - b) / n * 1e6 / 1048576 }'
done
echo "redis $(redis-server --version | awk '{ print $3 }'); used_memory from INFO memory (allocator view, jemalloc); every key has a lifetime"
