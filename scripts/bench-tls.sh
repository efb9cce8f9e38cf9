#!/usr/bin/env bash
# TLS benchmark: full TLS 1.3 handshakes per second on loopback, moat's implicit-TLS listener against
# `openssl s_server` with the same certificate and key (ECDSA P-256 and RSA 2048), in the same run; then the
# memory of an idle TLS session in moat (RSS growth over N open sessions / N). Resumed handshakes (`s_time
# -reuse`) are measured the same way, against both servers; since s_time never reads, it never receives TLS
# 1.3 tickets, so moat's CPU per resumed connection is also measured with scripts/bench-tls-resume.py.
#
#   scripts/bench-tls.sh            build moat in release mode, run everything, print a table
#
# Environment: SECONDS_PER_RUN (default 10), RESUME_N (default 1000 connections per kind), IDLE_SESSIONS (default 2000, at most 4000), SERVER_CPU (default 0),
# CLIENT_CPU (default 1), SKIP_BUILD=1 to use an existing release binary, CARGO_TARGET_DIR as for cargo.
#
# Each server is pinned to one core (taskset -c SERVER_CPU), the client (`openssl s_time -new`, one
# connection at a time, a full handshake each) to another. s_time connects, completes the handshake and
# closes; it never reads moat's SMTP greeting, which does not matter for the count. s_server (stdin at EOF)
# closes each connection right after its handshake. Neither side looks at a CA directory (-no-CApath ...), so
# OpenSSL does not scan /etc/ssl/certs per handshake. Only loopback is used.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
MOAT=$TARGET/release/moat
SECS=${SECONDS_PER_RUN:-10}
IDLE=${IDLE_SESSIONS:-2000}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
[ "$IDLE" -ge 1 ] && [ "$IDLE" -le 4000 ] || { echo "IDLE_SESSIONS must be 1..4000" >&2; exit 2; }
ulimit -n 16384 2>/dev/null || true
for p in openssl python3 taskset; do
    command -v "$p" >/dev/null || { echo "bench-tls: $p is required" >&2; exit 1; }
done

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    (cd "$ROOT" && cargo build --release --locked --bin moat >&2)
fi
[ -x "$MOAT" ] || { echo "bench-tls: no release binary at $MOAT" >&2; exit 1; }

TMP=$(mktemp -d)
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do
        kill "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    rm -rf "$TMP"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

wait_port() {
    local i
    for i in $(seq 1 200); do
        if python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',$1),1).close()" 2>/dev/null; then
            return 0
        fi
        sleep 0.05
    done
    echo "bench-tls: nothing listens on 127.0.0.1:$1" >&2
    return 1
}

# make_cert ALG: a self-signed certificate and key for bench.test in $TMP/ALG.{pem,key}.
make_cert() {
    local alg=$1 newkey
    case "$alg" in
        ecdsa) newkey=(-newkey ec -pkeyopt ec_paramgen_curve:P-256) ;;
        rsa) newkey=(-newkey rsa:2048) ;;
    esac
    openssl req -x509 "${newkey[@]}" -nodes -sha256 -days 2 -subj /CN=bench.test \
        -addext "subjectAltName=DNS:bench.test,IP:127.0.0.1" \
        -keyout "$TMP/$alg.key" -out "$TMP/$alg.pem" 2>/dev/null
}

# start_moat ALG PORT: moat with one implicit-TLS listener, pinned to SERVER_CPU; prints its pid.
start_moat() {
    local alg=$1 port=$2 dead
    dead=$(free_port) # nothing listens there: the benchmark never relays
    cat >"$TMP/moat-$alg.toml" <<EOF
server.hostname = "bench.test"
server.reverse_dns = false
metrics.address = ""
audit.destination = "off"
log.level = "warn"
upstream.address = "127.0.0.1:$dead"
limits.max_connections = 6000
limits.max_connections_per_ip = 6000
tls.min_version = "1.3"
tls.certificates = [ { cert = "$TMP/$alg.pem", key = "$TMP/$alg.key" } ]
[[listener]]
name = "smtps"
address = "127.0.0.1:$port"
mode = "implicit-tls"
EOF
    taskset -c "$SERVER_CPU" "$MOAT" serve --config "$TMP/moat-$alg.toml" >"$TMP/moat-$alg.log" 2>&1 &
    echo $!
}

# cpu_ticks PID: user + system CPU time of the process (all threads), in clock ticks.
cpu_ticks() {
    awk '{ print $14 + $15 }' "/proc/$1/stat"
}

# handshakes PID PORT [MODE]: MODE -new (default, full handshakes) or -reuse (resumed ones); "handshakes/s server-CPU-share handshakes-per-server-CPU-second" for one s_time run
# (full TLS 1.3 handshakes, one connection at a time). The rate is over wall time measured here (s_time's
# own "real seconds" are whole seconds); the last figure normalizes for a client that cannot saturate the
# server core.
handshakes() {
    local pid=$1 port=$2 mode=${3:--new} t0 t1 c0 c1 out n hz
    hz=$(getconf CLK_TCK)
    c0=$(cpu_ticks "$pid")
    t0=$(date +%s.%N)
    out=$(taskset -c "$CLIENT_CPU" openssl s_time -connect "127.0.0.1:$port" "$mode" -tls1_3 -time "$SECS" \
        -no-CApath -no-CAfile -no-CAstore 2>&1)
    t1=$(date +%s.%N)
    c1=$(cpu_ticks "$pid")
    n=$(echo "$out" | awk '/connections in .* real seconds/ { print $1; exit }')
    [ -n "$n" ] || { echo "bench-tls: s_time failed: $out" >&2; echo "0 0 0"; return; }
    awk -v n="$n" -v a="$t0" -v b="$t1" -v c="$((c1 - c0))" -v hz="$hz" \
        'BEGIN { cpu = c / hz; printf "%.0f %.0f%% %.0f\n", n / (b - a), 100 * cpu / (b - a), (cpu > 0 ? n / cpu : 0) }'
}

# idle_kib PID PORT N: RSS growth of PID, in KiB, per idle TLS session (handshake done, greeting read).
idle_kib() {
    python3 - "$1" "$2" "$3" <<'EOF'
import socket, ssl, sys, time
pid, port, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def rss():
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
def session():
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="bench.test")
    greeting = s.recv(512)
    assert greeting.startswith(b"220"), greeting
    return s
for _ in range(20):          # warm up allocator and runtime
    session().close()
time.sleep(0.5)
before = rss()
held = [session() for _ in range(n)]
time.sleep(1.0)
after = rss()
print(f"{(after - before) / n:.1f} {before} {after}")
for s in held:
    s.close()
EOF
}

declare -A RATE_MOAT RATE_OPENSSL IDLE_KIB REUSE_MOAT REUSE_OPENSSL TICKETS
for alg in ecdsa rsa; do
    make_cert "$alg"
    port=$(free_port)
    pid=$(start_moat "$alg" "$port")
    PIDS+=("$pid")
    wait_port "$port"
    RATE_MOAT[$alg]=$(handshakes "$pid" "$port")
    REUSE_MOAT[$alg]=$(handshakes "$pid" "$port" -reuse)
    TICKETS[$alg]=$(taskset -c "$CLIENT_CPU" python3 "$ROOT/scripts/bench-tls-resume.py" "$port" "$pid" "${RESUME_N:-1000}")
    kill "$pid"; wait "$pid" 2>/dev/null || true

    port=$(free_port)
    taskset -c "$SERVER_CPU" openssl s_server -accept "127.0.0.1:$port" -cert "$TMP/$alg.pem" -key "$TMP/$alg.key" \
        -tls1_3 -quiet -naccept 1000000 -no-CApath -no-CAfile -no-CAstore </dev/null >"$TMP/s_server-$alg.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    wait_port "$port"
    RATE_OPENSSL[$alg]=$(handshakes "$pid" "$port")
    REUSE_OPENSSL[$alg]=$(handshakes "$pid" "$port" -reuse)
    kill "$pid"; wait "$pid" 2>/dev/null || true

    # A fresh moat for the memory measurement, so the handshake run's allocations do not hide the growth.
    port=$(free_port)
    pid=$(start_moat "$alg" "$port")
    PIDS+=("$pid")
    wait_port "$port"
    IDLE_KIB[$alg]=$(idle_kib "$pid" "$port" "$IDLE")
    kill "$pid"; wait "$pid" 2>/dev/null || true
done

echo
echo "TLS 1.3 full handshakes, loopback, server on CPU $SERVER_CPU, client (openssl s_time -new) on CPU $CLIENT_CPU,"
echo "${SECS}s per run; idle memory over $IDLE sessions (python3 ssl, handshake done and greeting read)"
echo
printf '| %-11s | %-22s | %-22s | %-12s | %-14s | %-22s |\n' "certificate" "moat hs/s (server CPU)" \
    "openssl hs/s (server CPU)" "moat/openssl" "per CPU-second" "moat KiB / idle session"
printf '|%s|%s|%s|%s|%s|%s|\n' "-------------" "------------------------" "------------------------" "--------------" \
    "----------------" "------------------------"
for alg in ecdsa rsa; do
    label=$([ "$alg" = ecdsa ] && echo "ECDSA P-256" || echo "RSA 2048")
    read -r m_rate m_cpu m_per <<<"${RATE_MOAT[$alg]}"
    read -r o_rate o_cpu o_per <<<"${RATE_OPENSSL[$alg]}"
    ratio=$(awk -v a="$m_rate" -v b="$o_rate" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }')
    ratio_cpu=$(awk -v a="$m_per" -v b="$o_per" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }')
    read -r kib before after <<<"${IDLE_KIB[$alg]}"
    printf '| %-11s | %-22s | %-22s | %-12s | %-14s | %-22s |\n' "$label" "$m_rate ($m_cpu)" "$o_rate ($o_cpu)" \
        "$ratio" "$m_per vs $o_per ($ratio_cpu)" "$kib ($before -> $after KiB)"
done
echo
echo "resumed TLS 1.3 handshakes (openssl s_time -reuse: one full handshake, then the session resumed):"
for alg in ecdsa rsa; do
    read -r m_rate m_cpu m_per <<<"${REUSE_MOAT[$alg]}"
    read -r o_rate o_cpu o_per <<<"${REUSE_OPENSSL[$alg]}"
    printf '  %-6s moat %s hs/s (server CPU %s, %s per CPU-second); openssl %s hs/s (%s, %s per CPU-second)\n' \
        "$alg" "$m_rate" "$m_cpu" "$m_per" "$o_rate" "$o_cpu" "$o_per"
done
echo
echo "session tickets (scripts/bench-tls-resume.py: a client that reads the greeting, so it receives the tickets,"
echo "and offers the newest session on its next connection): moat's CPU per connection, full vs resumed"
for alg in ecdsa rsa; do
    read -r full resumed granted <<<"${TICKETS[$alg]}"
    printf '  %-6s full %s us, resumed %s us (%s resumed)\n' "$alg" "$full" "$resumed" "$granted"
done
