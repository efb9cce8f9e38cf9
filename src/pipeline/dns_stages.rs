//! Builds the stages that need DNS (blocklists, sender authentication) and DKIM signing, sharing one
//! resolver, for [`crate::server`]'s pipeline. They run before the rules stage, which reads their facts.

use std::sync::Arc;

use super::Stage;
use crate::config::Config;
use crate::dns::Dns;
use crate::shutdown::Shutdown;

/// The stages for `[dns]`, `[sender_auth]` and `[dkim]`, in pipeline order; empty when none is configured.
pub fn stages(config: &Config, shutdown: &Shutdown) -> Result<Vec<Arc<dyn Stage>>, String> {
    let mut out: Vec<Arc<dyn Stage>> = Vec::new();
    if !config.dkim.sign.is_empty() {
        let keys = crate::dkim::Keys::load(&config.dkim).map_err(|e| e.to_string())?;
        keys.spawn_watcher(shutdown.soft.clone());
        out.push(Arc::new(crate::dkim::SignStage::new(keys)));
    }
    let needs_dns = !config.dns.zones.is_empty() || config.sender_auth.enabled;
    if !needs_dns {
        return Ok(out);
    }
    let dns = Arc::new(Dns::new(&config.dns).map_err(|e| e.to_string())?);
    if let Some(s) = super::dnsbl::DnsblStage::new(dns.clone(), &config.dns) {
        out.push(Arc::new(s));
    }
    if config.sender_auth.enabled {
        let id = match config.sender_auth.authserv_id.as_str() {
            "" => config.hostname(),
            id => id.to_string(),
        };
        let deadline = config.dns.deadline.get();
        out.push(Arc::new(super::sender_auth::SenderAuthStage::new(dns.clone(), &config.sender_auth, id, deadline)));
    }
    Ok(out)
}
