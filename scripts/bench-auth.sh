#!/usr/bin/env bash
# End-to-end cost of sender authentication: scripts/bench-e2e.sh twice on the same build, once with the
# shipped config (no DNS checks) and once with [sender_auth] enabled (SPF for HELO and MAIL FROM, DKIM,
# ARC, DMARC) against a local dnsmasq serving the bench domain's SPF and DMARC records, then how many of
# moat's DNS lookups reached dnsmasq (the rest were answered from moat's cache).
#
#   scripts/bench-auth.sh            (needs target/release/moat and /usr/sbin/dnsmasq)
# Environment: BENCH_SHAPES (default "b": 10 KiB messages on reused connections), BENCH_QUICK=1,
#              DNS_TTL (default 300: the TTL dnsmasq gives its records; 0 makes every lookup a query).
# smtp-source's messages carry no DKIM signature: the per-signature verification cost is benches/dkim.rs.
# Everything runs on 127.0.0.1; dnsmasq is killed on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/bench-lib.sh
. "$ROOT/scripts/bench-lib.sh"
PY=$(command -v python3) || { echo "bench-auth: python3 is required" >&2; exit 1; }
DNSMASQ=${DNSMASQ:-/usr/sbin/dnsmasq}
[ -x "$DNSMASQ" ] || { echo "bench-auth: $DNSMASQ not found (apt-get install dnsmasq-base)" >&2; exit 1; }
WORK=$(mktemp -d /tmp/moat-bench-auth.XXXXXX)
DNS_PID=""
cleanup() {
    [ -n "$DNS_PID" ] && kill "$DNS_PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

DNS_PORT=$(free_port)
cat >"$WORK/dnsmasq.conf" <<CONF
local=/example/
txt-record=bench.example,"v=spf1 ip4:127.0.0.1 -all"
txt-record=_dmarc.bench.example,"v=DMARC1; p=none"
CONF
user_flag=()
[ "$(id -u)" = 0 ] && user_flag=(--user=root)
"$DNSMASQ" -k --no-resolv --no-hosts --listen-address=127.0.0.1 --bind-interfaces --port="$DNS_PORT" \
    --conf-file="$WORK/dnsmasq.conf" --pid-file= --cache-size=0 --local-ttl="${DNS_TTL:-300}" \
    --log-queries --log-facility="$WORK/dnsmasq.log" "${user_flag[@]}" &
DNS_PID=$!
sleep 0.5

# The auth config: the shipped one with sender_auth on and dnsmasq as the resolver.
sed -e "s/^enabled = false\$/enabled = true/" -e "s/^servers = \[\]\$/servers = [\"127.0.0.1:$DNS_PORT\"]/" \
    "$ROOT/config/moat.toml" >"$WORK/auth.toml"
grep -q "^servers = \[\"127.0.0.1:$DNS_PORT\"\]" "$WORK/auth.toml" || { echo "bench-auth: cannot set dns.servers" >&2; exit 1; }

export BENCH_SHAPES=${BENCH_SHAPES:-b}
echo "== without sender authentication"
"$ROOT/scripts/bench-e2e.sh"
echo "== with SPF+DKIM+ARC+DMARC (dnsmasq on 127.0.0.1:$DNS_PORT, TTL ${DNS_TTL:-300}s)"
BENCH_CONFIG="$WORK/auth.toml" "$ROOT/scripts/bench-e2e.sh"
queries=$(grep -c 'query\[' "$WORK/dnsmasq.log" || true)
echo "dnsmasq answered $queries queries for the run (each message needs 4 lookups: SPF HELO, SPF MAIL FROM," \
    "_dmarc.bench.example, _dmarc.example); the rest came from moat's cache (moat_dns_cache_total)"
