# Shared by the bench scripts (source it; it defines functions only). Needs $PY (python3) and a die().

# Stops the given processes: TERM, up to 5 s to exit, then KILL.
stop_pids() {
    local p
    for p in "$@"; do
        kill -TERM "$p" 2>/dev/null || true
    done
    for p in "$@"; do
        for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
    done
}

free_port() {
    "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# True if something listens on 127.0.0.1:PORT (from /proc/net/tcp; no probe connection).
listening() {
    awk -v want="$(printf ':%04X' "$1")" \
        'NR > 1 && (toupper($2) == "0100007F" want || toupper($2) == "00000000" want) && $4 == "0A" { f = 1 } END { exit !f }' /proc/net/tcp
}

wait_listening() { # port pid what
    for _ in $(seq 1 150); do
        listening "$1" && return 0
        kill -0 "$2" 2>/dev/null || die "$3 exited before listening on 127.0.0.1:$1"
        sleep 0.1
    done
    die "$3 did not listen on 127.0.0.1:$1 within 15s"
}
