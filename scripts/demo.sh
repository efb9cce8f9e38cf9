#!/usr/bin/env bash
# moat on loopback in one command, in front of a throwaway Postfix:
#
#   scripts/demo.sh          install postfix + swaks if missing, start Postfix (./run/postfix, 127.0.0.1:10025),
#                            build moat, start it with config/moat.toml (127.0.0.1:2525, 2587, 2465)
#   scripts/demo.sh stop     stop moat and the throwaway Postfix
#   scripts/demo.sh status   show what runs
#
# Running it again while everything runs changes nothing (moat is restarted only if its binary changed).
# Nothing outside ./run is touched, except installing packages; the system's Postfix is left alone.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
RUN="$ROOT/run"
PF_DIR="$RUN/postfix"
PF_PORT=10025
CONFIG="$ROOT/config/moat.toml"
BIN="$ROOT/target/release/moat"
PIDFILE="$RUN/moat.pid"
LOG="$RUN/moat.log"
MOAT_ADDR=127.0.0.1
MOAT_PORT=2525

say() { printf '==> %s\n' "$*"; }
die() { printf 'demo: %s\n' "$*" >&2; exit 1; }

listening() { # 127.0.0.1 port; read from /proc/net/tcp, without connecting (a probe would show up in the logs)
    local hex
    [ "$1" = 127.0.0.1 ] || die "listening() only knows 127.0.0.1"
    hex=$(printf ':%04X' "$2")
    awk -v want="$hex" 'NR > 1 && (toupper($2) == "0100007F" want || toupper($2) == "00000000" want) && $4 == "0A" { f = 1 } END { exit !f }' /proc/net/tcp
}

moat_pid() {
    local pid
    [ -r "$PIDFILE" ] || return 1
    pid=$(tr -dc '0-9' <"$PIDFILE")
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    # The pid must still be our moat (not a recycled pid).
    [ "$(readlink "/proc/$pid/exe" 2>/dev/null | sed 's/ (deleted)$//')" = "$BIN" ] || return 1
    echo "$pid"
}

stop_moat() {
    local pid
    if pid=$(moat_pid); then
        say "stopping moat (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        # moat drains for up to shutdown.grace_period (30s in config/moat.toml).
        for _ in $(seq 1 400); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            say "moat still running after 40s, killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$PIDFILE"
}

install_packages() {
    local missing=()
    command -v postfix >/dev/null 2>&1 || [ -x /usr/sbin/postfix ] || missing+=(postfix)
    command -v swaks >/dev/null 2>&1 || missing+=(swaks)
    # swaks --tls needs Net::SSLeay, which is only a "recommends" of the swaks package.
    dpkg -s libnet-ssleay-perl >/dev/null 2>&1 || missing+=(libnet-ssleay-perl)
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" = 0 ] || die "need root to install ${missing[*]} (or install them yourself)"
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # "No configuration": the package installs no main.cf and starts no system Postfix; we run our own.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

start() {
    [ "$(id -u)" = 0 ] || die "run as root: the throwaway Postfix needs it"
    install_packages
    mkdir -p "$RUN"

    say "starting a throwaway Postfix in $PF_DIR on 127.0.0.1:$PF_PORT"
    "$ROOT/scripts/postfix-instance.sh" start "$PF_DIR" "$PF_PORT"

    command -v cargo >/dev/null 2>&1 || die "cargo not found (install Rust: https://rustup.rs)"
    say "building moat (cargo build --release)"
    cargo build --release || die "cargo build --release failed (the throwaway Postfix still runs: fix and re-run, or scripts/demo.sh stop)"
    [ -x "$BIN" ] || die "no $BIN after the build"
    "$BIN" check --config "$CONFIG" >/dev/null || die "config check failed: $BIN check --config $CONFIG"

    local pid
    if pid=$(moat_pid); then
        # /proc/PID/exe ends in " (deleted)" when the build replaced the binary: restart on the new one.
        if readlink "/proc/$pid/exe" | grep -q ' (deleted)$'; then
            say "moat binary was rebuilt: restarting"
            stop_moat
        else
            say "moat already running (pid $pid)"
        fi
    fi
    if ! pid=$(moat_pid); then
        if listening "$MOAT_ADDR" "$MOAT_PORT"; then
            die "$MOAT_ADDR:$MOAT_PORT is in use by another process"
        fi
        say "starting moat: $BIN serve --config $CONFIG"
        nohup "$BIN" serve --config "$CONFIG" >>"$LOG" 2>&1 </dev/null &
        pid=$!
        echo "$pid" >"$PIDFILE"
        for _ in $(seq 1 150); do
            listening "$MOAT_ADDR" "$MOAT_PORT" && break
            kill -0 "$pid" 2>/dev/null || { tail -n 20 "$LOG" >&2; rm -f "$PIDFILE"; die "moat exited; log: $LOG"; }
            sleep 0.1
        done
        listening "$MOAT_ADDR" "$MOAT_PORT" || { stop_moat; tail -n 20 "$LOG" >&2; die "moat did not listen on $MOAT_ADDR:$MOAT_PORT within 15s"; }
    fi

    cat <<EOF

moat is running (pid $(moat_pid)) on 127.0.0.1:2525 (mx, STARTTLS), 2587 (submission), 2465 (implicit TLS),
relaying to Postfix on 127.0.0.1:$PF_PORT; metrics on http://127.0.0.1:9925/metrics.

Send a test message:
  swaks --server 127.0.0.1:2525 --from a@example.org --to b@example.test
  swaks --server 127.0.0.1:2525 --from a@example.org --to b@example.test --tls    # with STARTTLS
  swaks --server 127.0.0.1:2525 --from a@example.org --to reject@example.test     # Postfix says 550, moat passes it on
  swaks --server 127.0.0.1:2525 --from a@example.org --to x@elsewhere.example     # moat: 554 relay access denied

Delivered mail:  $PF_DIR/mail/new/   (one file per message)
Logs:            moat $LOG
                 Postfix $PF_DIR/maillog
Stop everything: scripts/demo.sh stop
EOF
}

stop() {
    stop_moat
    if [ -d "$PF_DIR" ]; then
        "$ROOT/scripts/postfix-instance.sh" stop "$PF_DIR"
    fi
    say "stopped (files stay in $RUN; rm -rf $RUN to clean up)"
}

status() {
    local pid rc=0
    if pid=$(moat_pid); then echo "moat running (pid $pid)"; else echo "moat not running"; rc=3; fi
    if [ -d "$PF_DIR" ]; then
        "$ROOT/scripts/postfix-instance.sh" status "$PF_DIR" || rc=3
    else
        echo "postfix instance not created"
        rc=3
    fi
    return $rc
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac
