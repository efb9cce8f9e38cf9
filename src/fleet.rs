//! What a fleet of instances adds to admitting a connection (docs/fleet.md): the real client address from a
//! load balancer's PROXY protocol header ([`ProxySettings::client`]), and the per-client concurrency limit
//! counted across the fleet with leases in the shared store ([`FleetAdmission::lease`]).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use tracing::{debug, warn};

use crate::client_key::ClientKey;
use crate::config::state::Failure;
use crate::config::{ListenerConfig, StateBackend, StateConfig};
use crate::metrics::ProxyRefusal;
use crate::proxy_protocol::{self, Accept, ReadError};
use crate::rules::lists::CidrSet;
use crate::state::lease::Lease;
use crate::state::SharedStore;

/// The time a balancer has to send its whole header (it sends it at once, right after connecting).
pub const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// A listener's `proxy_protocol` settings.
#[derive(Debug)]
pub struct ProxySettings {
    accept: Accept,
    trusted: CidrSet,
    timeout: Duration,
}

impl ProxySettings {
    /// `None` when the listener takes no header.
    pub fn from_listener(l: &ListenerConfig) -> Option<ProxySettings> {
        Some(ProxySettings {
            accept: l.proxy_protocol.accept()?,
            trusted: crate::config::proxy::trusted_set(&l.proxy_trusted),
            timeout: PROXY_HEADER_TIMEOUT,
        })
    }

    /// Reads the header of a connection from `peer` (the balancer) and returns the real client and the
    /// address it connected to. `None`: the connection must be closed (untrusted source, malformed or
    /// missing header, timeout); that is logged and counted here. A `LOCAL`/`UNKNOWN` header (the
    /// balancer's own health check) keeps the TCP addresses.
    pub async fn client(
        &self,
        stream: &mut TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Option<(SocketAddr, SocketAddr)> {
        if !self.trusted.contains(peer.ip()) {
            warn!(client.addr = %peer, "connection from outside proxy_trusted on a PROXY protocol listener; closed");
            crate::metrics::proxy_header_refused(ProxyRefusal::Untrusted);
            return None;
        }
        match proxy_protocol::read_header(stream, self.accept, self.timeout).await {
            Ok(h) => {
                debug!(version = h.version, source = ?h.source, "proxy header");
                Some((h.source.unwrap_or(peer), h.destination.unwrap_or(local)))
            }
            Err(e) => {
                let reason = match &e {
                    ReadError::Timeout(_) | ReadError::Io(_) => ProxyRefusal::Timeout,
                    ReadError::Proxy(_) => ProxyRefusal::Malformed,
                };
                warn!(balancer.addr = %peer, error = %e, "bad PROXY protocol header; connection closed");
                crate::metrics::proxy_header_refused(reason);
                None
            }
        }
    }
}

/// The per-client concurrency limit across the fleet.
#[derive(Debug)]
pub struct FleetAdmission {
    store: SharedStore,
    /// Only a shared store needs leases: with the memory store the in-process count already is the
    /// whole count.
    shared: bool,
    ttl: Duration,
    on_error: Failure,
}

/// The fleet refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The client already holds its `max_connections_per_ip` across the fleet.
    Full,
    /// The store failed and `state.on_error.concurrency = "closed"`.
    StoreFailed,
}

impl FleetAdmission {
    /// From `[state]`.
    pub fn new(store: SharedStore, cfg: &StateConfig) -> FleetAdmission {
        FleetAdmission {
            store,
            shared: cfg.backend != StateBackend::Memory,
            ttl: cfg.lease_ttl.get(),
            on_error: cfg.on_error.concurrency,
        }
    }

    /// Takes one of the client's `max` leases for connection `holder` (the client: its [`ClientKey`], an
    /// IPv6 client per prefix). `Ok(None)`: admitted without a lease (memory store, or the store failed
    /// and concurrency fails open).
    pub async fn lease(&self, client: ClientKey, holder: &str, max: usize) -> Result<Option<Lease>, Refusal> {
        if !self.shared {
            return Ok(None);
        }
        let max = u32::try_from(max).unwrap_or(u32::MAX);
        match Lease::take(self.store.clone(), format!("conn:{client}"), holder.to_string(), max, self.ttl).await {
            Ok(Some(l)) => Ok(Some(l)),
            Ok(None) => Err(Refusal::Full),
            Err(e) => match self.on_error {
                Failure::Open => {
                    debug!(error = %e, "fleet connection count unknown; admitted (state.on_error.concurrency = open)");
                    Ok(None)
                }
                Failure::Closed => Err(Refusal::StoreFailed),
            },
        }
    }
}
