#!/usr/bin/env bash
# A two-instance moat fleet on loopback in one command (docs/fleet.md):
#
#   scripts/fleet-demo.sh          start a throwaway Postfix (./run/postfix, 127.0.0.1:10025), Redis
#                                  (127.0.0.1:6390, no persistence), moat A (127.0.0.1:2625) and moat B
#                                  (127.0.0.1:2626) sharing their state in that Redis, and HAProxy on
#                                  127.0.0.1:2725 spreading clients over both with PROXY protocol v2
#   scripts/fleet-demo.sh stop     stop all of them
#   scripts/fleet-demo.sh status   show what runs
#
# Configs: config/examples/fleet/ (haproxy.cfg, moat-a.toml, moat-b.toml, rules/ with the example rate limit
# of 10 messages per minute per client IP). Everything runs from the repository root; files go to ./run/fleet.
# Needs root (the throwaway Postfix), redis-server and haproxy (installed if missing), cargo.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
RUN="$ROOT/run"
FLEET="$RUN/fleet"
EX="$ROOT/config/examples/fleet"
PF_DIR="$RUN/postfix"
PF_PORT=10025
REDIS_PORT=6390
BIN="$ROOT/target/release/moat"

say() { printf '==> %s\n' "$*"; }
die() { printf 'fleet-demo: %s\n' "$*" >&2; exit 1; }

listening() { # port on 127.0.0.1, from /proc/net/tcp (no probe connection)
    awk -v want="$(printf ':%04X' "$1")" \
        'NR > 1 && (toupper($2) == "0100007F" want || toupper($2) == "00000000" want) && $4 == "0A" { f = 1 } END { exit !f }' /proc/net/tcp
}

pid_of() { # name: prints the pid from $FLEET/NAME.pid if that process runs
    local pid
    [ -r "$FLEET/$1.pid" ] || return 1
    pid=$(tr -dc '0-9' <"$FLEET/$1.pid")
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    echo "$pid"
}

wait_port() { # port name
    for _ in $(seq 1 150); do
        listening "$1" && return 0
        sleep 0.1
    done
    die "$2 did not listen on 127.0.0.1:$1 within 15s (logs in $FLEET)"
}

stop_one() { # name
    local pid
    if pid=$(pid_of "$1"); then
        say "stopping $1 (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 400); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$FLEET/$1.pid"
}

install_packages() {
    local missing=()
    command -v postfix >/dev/null 2>&1 || [ -x /usr/sbin/postfix ] || missing+=(postfix)
    command -v swaks >/dev/null 2>&1 || missing+=(swaks)
    command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
    command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
    [ ${#missing[@]} -eq 0 ] && return 0
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # The packages' own services are not part of the demo.
    systemctl disable --now redis-server haproxy >/dev/null 2>&1 || true
}

start_moat() { # a|b port
    local name="moat-$1"
    pid_of "$name" >/dev/null && { say "$name already running"; return 0; }
    listening "$2" && die "127.0.0.1:$2 is in use by another process"
    "$BIN" check --config "$EX/$name.toml" >/dev/null || die "config check failed: $BIN check --config $EX/$name.toml"
    say "starting $name on 127.0.0.1:$2"
    nohup "$BIN" serve --config "$EX/$name.toml" >>"$FLEET/$name.log" 2>&1 </dev/null &
    echo $! >"$FLEET/$name.pid"
    wait_port "$2" "$name"
}

start() {
    [ "$(id -u)" = 0 ] || die "run as root: the throwaway Postfix needs it"
    install_packages
    mkdir -p "$FLEET"

    say "starting a throwaway Postfix in $PF_DIR on 127.0.0.1:$PF_PORT"
    "$ROOT/scripts/postfix-instance.sh" start "$PF_DIR" "$PF_PORT"

    if ! pid_of redis >/dev/null; then
        listening "$REDIS_PORT" && die "127.0.0.1:$REDIS_PORT is in use by another process"
        say "starting Redis on 127.0.0.1:$REDIS_PORT (no persistence)"
        redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
            --pidfile "$FLEET/redis.pid" --logfile "$FLEET/redis.log" --dir "$FLEET"
        wait_port "$REDIS_PORT" redis
    fi

    command -v cargo >/dev/null 2>&1 || die "cargo not found (install Rust: https://rustup.rs)"
    say "building moat (cargo build --release)"
    cargo build --release || die "cargo build --release failed"
    start_moat a 2625
    start_moat b 2626

    if ! pid_of haproxy >/dev/null; then
        listening 2725 && die "127.0.0.1:2725 is in use by another process"
        say "starting HAProxy on 127.0.0.1:2725"
        haproxy -D -p "$FLEET/haproxy.pid" -f "$EX/haproxy.cfg" 2>>"$FLEET/haproxy.log" || die "haproxy failed: $(tail -n 3 "$FLEET/haproxy.log")"
        wait_port 2725 haproxy
    fi

    cat <<EOF2

The fleet runs: HAProxy 127.0.0.1:2725 -> moat A 127.0.0.1:2625 / moat B 127.0.0.1:2626 (PROXY v2),
state in Redis 127.0.0.1:$REDIS_PORT, relaying to Postfix 127.0.0.1:$PF_PORT; metrics on :9926 (A) and :9927 (B).

Send mail through the balancer (each connection lands on A or B; the audit records say which):
  swaks --server 127.0.0.1:2725 --from a@example.org --to b@example.test
  for i in \$(seq 1 12); do swaks --server 127.0.0.1:2725 --from a@example.org --to b@example.test -q; done
      # the example limit is 10 messages per minute per client IP across both: the 11th gets 451 4.7.1
  redis-cli -p $REDIS_PORT --scan --pattern 'moat:*'        # the shared state
  curl -s 127.0.0.1:9926/readyz; redis-cli -p $REDIS_PORT shutdown nosave; curl -s 127.0.0.1:9926/readyz

Audit:    $FLEET/audit-a.jsonl  $FLEET/audit-b.jsonl  (client_ip is the real client, not HAProxy)
Logs:     $FLEET/moat-a.log  $FLEET/moat-b.log  $FLEET/haproxy.log  $FLEET/redis.log  $PF_DIR/maillog
Delivered mail: $PF_DIR/mail/new/
Stop everything: scripts/fleet-demo.sh stop
EOF2
}

stop() {
    stop_one haproxy
    stop_one moat-a
    stop_one moat-b
    stop_one redis
    if [ -d "$PF_DIR" ]; then
        "$ROOT/scripts/postfix-instance.sh" stop "$PF_DIR"
    fi
    say "stopped (files stay in $RUN; rm -rf $RUN to clean up)"
}

status() {
    local rc=0 name pid
    for name in haproxy moat-a moat-b redis; do
        if pid=$(pid_of "$name"); then echo "$name running (pid $pid)"; else echo "$name not running"; rc=3; fi
    done
    if [ -d "$PF_DIR" ]; then "$ROOT/scripts/postfix-instance.sh" status "$PF_DIR" || rc=3; else echo "postfix instance not created"; rc=3; fi
    return $rc
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac
