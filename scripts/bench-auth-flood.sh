#!/usr/bin/env bash
# AUTH flood benchmark on loopback (issue #4): do other sessions stay responsive while clients hammer
# AUTH with wrong passwords?  smtp-sink <- moat (release) <- a probe client, then the same probe while
# FLOODERS concurrent connections send AUTH PLAIN with wrong passwords as fast as moat answers.
#
# The probe (its own process, from 127.0.0.2) measures round trips in milliseconds:
#   greeting  TCP connect until the 220 greeting, a new connection each sample
#   EHLO NOOP MAIL RCPT RSET   one after the other on one connection (MAIL/RCPT go to the upstream)
#   auth_ok   a good AUTH PLAIN on a fresh connection (it waits behind the flood's verifications)
# and prints p50/p99/max per command, idle and under flood, plus the verifications/s the flood achieved.
#
# The flood comes from FLOOD_SOURCES addresses 127.0.0.10 and up (flooder n uses address n mod
# FLOOD_SOURCES), with a fresh user name per attempt (unknown users cost one argon2 verification, against a
# dummy hash, like known ones). The lockout is neutralised (threshold 10^9, window 1s, failure_delay 0) so
# that every attempt reaches verification: with one address per flooder this is the worst case, a
# distributed attack the lockout cannot stop. BENCH_LOCKOUT=default keeps the shipped lockout settings.
#
#   scripts/bench-auth-flood.sh           (needs target/release/moat: cargo build --release)
# Environment: MOAT_BIN (default target/release/moat), FLOODERS (64), FLOOD_SOURCES (default FLOODERS,
#              at most 200), SAMPLES (300 per command), GREETINGS (100), AUTH_SAMPLES (20), WARMUP_S (2),
#              AUTH_PERMITS (auth.max_concurrent_verifications, default 0 = cores),
#              BENCH_LOCKOUT (off | default).
#
# Everything runs on 127.0.0.1/127.0.0.2; every process this script starts is killed on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/bench-lib.sh
. "$ROOT/scripts/bench-lib.sh"
MOAT_BIN=${MOAT_BIN:-$ROOT/target/release/moat}
CONFIG_SRC="$ROOT/config/moat.toml"
FLOODERS=${FLOODERS:-64}
SAMPLES=${SAMPLES:-300}
GREETINGS=${GREETINGS:-100}
AUTH_SAMPLES=${AUTH_SAMPLES:-20}
WARMUP_S=${WARMUP_S:-2}
AUTH_PERMITS=${AUTH_PERMITS:-0}
FLOOD_SOURCES=${FLOOD_SOURCES:-$FLOODERS}
BENCH_LOCKOUT=${BENCH_LOCKOUT:-off}
SMTP_SINK=$(command -v smtp-sink || echo /usr/sbin/smtp-sink)
PY=$(command -v python3) || { echo "bench: python3 is required" >&2; exit 1; }

die() { echo "bench: $*" >&2; exit 1; }
[ -x "$SMTP_SINK" ] || die "smtp-sink not found (apt-get install postfix)"
[ -x "$MOAT_BIN" ] || die "$MOAT_BIN not found: run 'cargo build --release' first (or set MOAT_BIN)"
for v in FLOODERS FLOOD_SOURCES SAMPLES GREETINGS AUTH_SAMPLES WARMUP_S AUTH_PERMITS; do
    if ! [[ ${!v} =~ ^[0-9]+$ ]] || [ "${!v}" -gt 100000 ]; then die "$v must be a number up to 100000"; fi
done
[ "$FLOODERS" -le 1000 ] || die "FLOODERS must be at most 1000"
[ "$FLOOD_SOURCES" -gt 200 ] && FLOOD_SOURCES=200
[ "$FLOOD_SOURCES" -ge 1 ] || die "FLOOD_SOURCES must be at least 1"
case "$BENCH_LOCKOUT" in off | default) ;; *) die "BENCH_LOCKOUT must be off or default" ;; esac

WORK=$(mktemp -d /tmp/moat-auth-bench.XXXXXX)
SINK_PID=""
MOAT_PID=""
FLOOD_PID=""
cleanup() {
    touch "$WORK/flood.stop" 2>/dev/null || true
    # shellcheck disable=SC2086 # empty ones vanish
    stop_pids $FLOOD_PID $MOAT_PID $SINK_PID
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ulimit -n 8192 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true


# ---------------------------------------------------------------- smtp-sink
SINK_PORT=$(free_port)
if [ "$(id -u)" = 0 ]; then SINK_USER=(-u nobody); else SINK_USER=(); fi
"$SMTP_SINK" "${SINK_USER[@]}" -m 2048 -t 100 "127.0.0.1:$SINK_PORT" 1024 >"$WORK/sink.log" 2>&1 &
SINK_PID=$!
wait_listening "$SINK_PORT" "$SINK_PID" smtp-sink

# ---------------------------------------------------------------- users file
# One real user, hashed by moat itself (default argon2id parameters), the password on stdin.
BENCH_USER=bench@bench.example
BENCH_PW="bench-$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')"
printf '%s\n' "$BENCH_PW" | "$MOAT_BIN" user add "$BENCH_USER" --users "$WORK/users.toml" >/dev/null \
    || die "moat user add failed"
grep -qF '$argon2id$' "$WORK/users.toml" || die "users file has no argon2id hash"

# ---------------------------------------------------------------- moat
MOAT_PORT=$(free_port)
# A copy of config/moat.toml: one plain listener with AUTH allowed without TLS (loopback only), upstream =
# smtp-sink without client identity, metrics off, audit to a file, generous connection limits.
LOCKOUT_KEYS=()
if [ "$BENCH_LOCKOUT" = off ]; then
    LOCKOUT_KEYS=(auth.lockout_threshold=1000000000 'auth.lockout_window="1s"' 'auth.failure_delay="0ms"')
fi
"$PY" "$ROOT/scripts/bench-config.py" "$CONFIG_SRC" "$WORK/moat.toml" "$MOAT_PORT" \
    --listener-extra "auth_without_tls = true" \
    server.reverse_dns=false "upstream.address=\"127.0.0.1:$SINK_PORT\"" 'upstream.identity="none"' \
    'metrics.address=""' "audit.destination=\"$WORK/audit.jsonl\"" limits.max_connections=5000 \
    limits.max_connections_per_ip=5000 'relay.local_domains=["sink.example"]' \
    "auth.users_file=\"$WORK/users.toml\"" "auth.max_concurrent_verifications=$AUTH_PERMITS" \
    "${LOCKOUT_KEYS[@]}"
"$MOAT_BIN" check --config "$WORK/moat.toml" >/dev/null || die "moat check rejects $WORK/moat.toml"
"$MOAT_BIN" serve --config "$WORK/moat.toml" >"$WORK/moat.log" 2>&1 &
MOAT_PID=$!
wait_listening "$MOAT_PORT" "$MOAT_PID" moat

# ---------------------------------------------------------------- clients
cat >"$WORK/smtp.py" <<'PYEOF'
"""A minimal blocking SMTP client for the bench (stdlib only)."""
import socket

TIMEOUT = 60


class Conn:
    def __init__(self, port, src):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT, source_address=(src, 0))
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.f = self.s.makefile("rb")

    def reply(self):
        """One reply's code (0: closed), reading every line of a multi-line reply (at most 100)."""
        for _ in range(100):
            line = self.f.readline(4096)
            if not line:
                return 0
            if len(line) < 4 or line[3:4] != b"-":
                return int(line[:3]) if line[:3].isdigit() else 0
        return 0

    def cmd(self, line):
        self.s.sendall(line.encode() + b"\r\n")
        return self.reply()

    def close(self):
        try:
            self.s.sendall(b"QUIT\r\n")
        except OSError:
            pass
        self.f.close()
        self.s.close()
PYEOF

# probe.py PORT SAMPLES GREETINGS AUTH_SAMPLES USER PASSWORD -> one line per command: name n p50 p99 max (ms)
cat >"$WORK/probe.py" <<'PYEOF'
import base64, math, sys, time
from smtp import Conn

port, samples, greetings, auth_samples = (int(a) for a in sys.argv[1:5])
user, password = sys.argv[5:7]
SRC = "127.0.0.2"
ms = lambda t0: (time.perf_counter() - t0) * 1000
times = {k: [] for k in ("greeting", "EHLO", "NOOP", "MAIL", "RCPT", "RSET", "auth_ok")}
errors = []


def expect(c, line, want, key):
    t0 = time.perf_counter()
    code = c.cmd(line)
    times[key].append(ms(t0))
    if code != want:
        errors.append(f"{key}: {code} (wanted {want})")


for _ in range(greetings):
    t0 = time.perf_counter()
    c = Conn(port, SRC)
    code = c.reply()
    times["greeting"].append(ms(t0))
    if code != 220:
        errors.append(f"greeting: {code}")
    c.close()

c = Conn(port, SRC)
c.reply()
for _ in range(samples):
    expect(c, "EHLO probe.bench.example", 250, "EHLO")
    expect(c, "NOOP", 250, "NOOP")
    expect(c, "MAIL FROM:<probe@bench.example>", 250, "MAIL")
    expect(c, "RCPT TO:<rcpt@sink.example>", 250, "RCPT")
    expect(c, "RSET", 250, "RSET")
c.close()

good = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
for _ in range(auth_samples):
    c = Conn(port, SRC)
    c.reply()
    c.cmd("EHLO probe.bench.example")
    expect(c, "AUTH PLAIN " + good, 235, "auth_ok")
    c.close()


def pct(v, q):
    s = sorted(v)
    return s[max(0, min(len(s) - 1, math.ceil(q * len(s)) - 1))]


for k, v in times.items():
    if v:
        print(f"{k} {len(v)} {pct(v, 0.5):.2f} {pct(v, 0.99):.2f} {max(v):.2f}")
for e in errors[:5]:
    print("error", e.replace(" ", "_"))
print("errors", len(errors))
PYEOF

# flood.py PORT THREADS SOURCES READY STOP -> on stop: "attempts N verifications N seconds S codes {...}"
cat >"$WORK/flood.py" <<'PYEOF'
import base64, os, sys, threading, time
from smtp import Conn

port, threads, sources, ready, stop = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
done = threading.Event()
lock = threading.Lock()
codes = {}


def count(code):
    with lock:
        codes[code] = codes.get(code, 0) + 1


def flooder(n):
    i = 0
    src = f"127.0.0.{10 + n % sources}"
    while not done.is_set():
        try:
            c = Conn(port, src)
            if c.reply() != 220 or c.cmd("EHLO flood.bench.example") != 250:
                c.close()
                count("no-session")
                time.sleep(0.01)
                continue
            while not done.is_set():
                i += 1
                payload = base64.b64encode(f"\0flood{n}x{i}@bench.example\0wrong-{i}".encode()).decode()
                code = c.cmd("AUTH PLAIN " + payload)
                count(code)
                if code in (0, 421):
                    break
            c.close()
        except OSError as e:
            count(type(e).__name__)
            time.sleep(0.01)


workers = [threading.Thread(target=flooder, args=(n,), daemon=True) for n in range(threads)]
t0 = time.perf_counter()
for w in workers:
    w.start()
open(ready, "w").close()
deadline = time.time() + 1800
while not os.path.exists(stop) and time.time() < deadline:
    time.sleep(0.05)
with lock:
    snapshot = dict(codes)
elapsed = time.perf_counter() - t0
done.set()
for w in workers:
    w.join(timeout=5)
attempts = sum(v for k, v in snapshot.items() if isinstance(k, int) and k != 0)
print(f"attempts {attempts} verifications {snapshot.get(535, 0)} seconds {elapsed:.2f} codes {snapshot}")
PYEOF

probe() { # label -> writes $WORK/probe.LABEL
    (cd "$WORK" && timeout 1200 "$PY" probe.py "$MOAT_PORT" "$SAMPLES" "$GREETINGS" "$AUTH_SAMPLES" \
        "$BENCH_USER" "$BENCH_PW") >"$WORK/probe.$1" 2>"$WORK/probe.$1.err" \
        || die "probe ($1) failed: $(tail -n 5 "$WORK/probe.$1.err")"
}

# ---------------------------------------------------------------- phase 1: idle
probe idle

# ---------------------------------------------------------------- phase 2: flood
(cd "$WORK" && exec "$PY" flood.py "$MOAT_PORT" "$FLOODERS" "$FLOOD_SOURCES" "$WORK/flood.ready" "$WORK/flood.stop") \
    >"$WORK/flood.out" 2>"$WORK/flood.err" &
FLOOD_PID=$!
for _ in $(seq 1 100); do [ -e "$WORK/flood.ready" ] && break; sleep 0.1; done
[ -e "$WORK/flood.ready" ] || die "flooders did not start: $(tail -n 5 "$WORK/flood.err")"
sleep "$WARMUP_S"
CPU0=$(awk '{ print $14 + $15 }' "/proc/$MOAT_PID/stat")
T0=$(date +%s.%N)
probe flood
T1=$(date +%s.%N)
CPU1=$(awk '{ print $14 + $15 }' "/proc/$MOAT_PID/stat")
touch "$WORK/flood.stop"
for _ in $(seq 1 300); do kill -0 "$FLOOD_PID" 2>/dev/null || break; sleep 0.1; done
wait "$FLOOD_PID" 2>/dev/null || true
FLOOD_PID=""
kill -0 "$MOAT_PID" 2>/dev/null || die "moat died; log: $(tail -n 20 "$WORK/moat.log")"

# ---------------------------------------------------------------- report
echo "AUTH flood bench: $FLOODERS flooders from $FLOOD_SOURCES addresses (AUTH PLAIN, wrong passwords, lockout $BENCH_LOCKOUT)," \
    "auth.max_concurrent_verifications=$AUTH_PERMITS, $(nproc) cores; round trips in ms"
printf '%-10s %6s %9s %9s %9s   %6s %9s %9s %9s\n' command n idle_p50 idle_p99 idle_max n flood_p50 flood_p99 flood_max
join -j 1 <(grep -v '^error' "$WORK/probe.idle" | sort) <(grep -v '^error' "$WORK/probe.flood" | sort) |
    awk '$1 != "errors" { printf "%-10s %6d %9.2f %9.2f %9.2f   %6d %9.2f %9.2f %9.2f\n", $1, $2, $3, $4, $5, $6, $7, $8, $9 }'
echo "probe errors: idle $(awk '$1 == "errors" { print $2 }' "$WORK/probe.idle")," \
    "flood $(awk '$1 == "errors" { print $2 }' "$WORK/probe.flood")"
grep -h '^error ' "$WORK/probe.idle" "$WORK/probe.flood" | head -n 5 || true
read -r _ ATTEMPTS _ VERIFS _ SECS _ CODES <"$WORK/flood.out" || die "no flood result: $(tail -n 5 "$WORK/flood.err")"
awk -v a="$ATTEMPTS" -v v="$VERIFS" -v s="$SECS" -v c0="$CPU0" -v c1="$CPU1" -v t0="$T0" -v t1="$T1" \
    -v hz="$(getconf CLK_TCK)" 'BEGIN {
    printf "flood: %d AUTH replies, %d verifications (535) in %.1f s: %.1f verifications/s\n", a, v, s, v / s
    printf "moat CPU during the flood probe: %.2f cores\n", (c1 - c0) / hz / (t1 - t0)
}'
echo "flood reply codes: $CODES"
echo "moat log: $(grep -ciE '(warn|error)' "$WORK/moat.log" || true) warning/error lines of $(wc -l <"$WORK/moat.log")"
