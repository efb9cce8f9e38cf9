//! DKIM signing of authenticated submissions (docs/authentication.md): one key per sender domain
//! (`[[dkim.sign]]`), reloaded when its file changes, and the streaming signer the relay runs over the
//! spooled message (only the header section is buffered, the body is hashed chunk by chunk).
//!
//! The [`SignStage`] picks the key by the From header's domain at end of data and leaves a
//! [`SignRequest`] in the transaction; the driver calls [`sign_spool`] just before relaying and prepends
//! the `DKIM-Signature:` header. [`keygen`] backs `moat dkim keygen`.

pub mod keygen;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256, SigningKey};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{DkimSigner, Done};
use rustls::pki_types::PrivateKeyDer;
use tokio_util::sync::CancellationToken;

use crate::config::{DkimConfig, DkimSignConfig, Role};
use crate::metrics::SignResult;
use crate::pipeline::stage::{proceed, HookFuture, Stage};
use crate::pipeline::{ConnInfo, MessageView, TxnContext};
use crate::spool::Spool;

/// Why a key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum DkimError {
    #[error("cannot read DKIM key {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("DKIM key {}: {message}", path.display())]
    Key { path: PathBuf, message: String },
}

/// A loaded signer for one domain.
pub enum Signer {
    Rsa(DkimSigner<RsaKey<Sha256>, Done>),
    Ed25519(DkimSigner<Ed25519Key, Done>),
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Signer::Rsa(_) => "Signer::Rsa",
            Signer::Ed25519(_) => "Signer::Ed25519",
        })
    }
}

fn build<T: SigningKey>(key: T, c: &DkimSignConfig) -> DkimSigner<T, Done> {
    let headers: Vec<String> = c.headers.iter().chain(c.oversign.iter()).cloned().collect();
    DkimSigner::from_key(key).domain(c.domain.to_ascii_lowercase()).selector(c.selector.clone()).headers(headers)
}

/// Loads the key of one `[[dkim.sign]]` (blocking). RSA keys must have at least 2048 bits.
pub fn load_signer(c: &DkimSignConfig) -> Result<Signer, DkimError> {
    let path = c.key_file.clone();
    let pem = std::fs::read(&path).map_err(|source| DkimError::Read { path: path.clone(), source })?;
    let bad = |message: String| DkimError::Key { path: path.clone(), message };
    let key = rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| bad(e.to_string()))?
        .ok_or_else(|| bad("no private key in the file".into()))?;
    if let PrivateKeyDer::Pkcs8(p8) = &key {
        if let Ok(k) = Ed25519Key::from_pkcs8_der(p8.secret_pkcs8_der()) {
            return Ok(Signer::Ed25519(build(k, c)));
        }
    }
    let der_len = key.secret_der().len();
    // A 2048-bit RSA private key is about 1190 bytes of DER (PKCS#1) or 1215 (PKCS#8); 1024 bits about 600.
    if der_len < 1000 {
        return Err(bad("RSA keys must have at least 2048 bits".into()));
    }
    let k = RsaKey::<Sha256>::from_key_der(key).map_err(|e| bad(format!("not an RSA or Ed25519 key: {e}")))?;
    Ok(Signer::Rsa(build(k, c)))
}

/// The keys by domain, swapped whole on reload.
pub struct Keys {
    config: DkimConfig,
    map: ArcSwap<HashMap<String, Arc<Signer>>>,
    stamp: Arc<Mutex<Option<Vec<crate::watch::Stamp>>>>,
}

impl Keys {
    /// Loads every key (blocking: at start-up); any failure refuses the configuration.
    pub fn load(config: &DkimConfig) -> Result<Arc<Keys>, DkimError> {
        let map = Self::read(config)?;
        let stamp = Arc::new(Mutex::new(Some(stamps(config))));
        Ok(Arc::new(Keys { config: config.clone(), map: ArcSwap::from_pointee(map), stamp }))
    }

    fn read(config: &DkimConfig) -> Result<HashMap<String, Arc<Signer>>, DkimError> {
        config.sign.iter().map(|c| Ok((c.domain.to_ascii_lowercase(), Arc::new(load_signer(c)?)))).collect()
    }

    /// The signer for `domain`.
    pub fn get(&self, domain: &str) -> Option<Arc<Signer>> {
        self.map.load().get(&domain.to_ascii_lowercase()).cloned()
    }

    /// Reloads the keys; on failure the keys in force stay.
    pub async fn reload(self: &Arc<Self>) {
        let me = Arc::clone(self);
        let loaded = tokio::task::spawn_blocking(move || Self::read(&me.config)).await;
        match loaded {
            Ok(Ok(map)) => {
                self.map.store(Arc::new(map));
                tracing::info!("DKIM keys reloaded");
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "DKIM keys not reloaded, the old ones stay"),
            Err(e) => tracing::warn!(error = %e, "DKIM key reload failed"),
        }
    }

    /// Watches the key files (`dkim.watch_interval`; 0 disables it).
    pub fn spawn_watcher(self: &Arc<Self>, shutdown: CancellationToken) {
        let interval = self.config.watch_interval.get();
        if interval.is_zero() {
            return;
        }
        let config = self.config.clone();
        let me = Arc::clone(self);
        crate::watch::spawn(
            interval.max(Duration::from_millis(100)),
            shutdown,
            Arc::clone(&self.stamp),
            move || stamps(&config),
            move || {
                let me = Arc::clone(&me);
                async move { me.reload().await }
            },
        );
    }
}

fn stamps(config: &DkimConfig) -> Vec<crate::watch::Stamp> {
    config.sign.iter().map(|c| crate::watch::stamp(&c.key_file)).collect()
}

/// What the relay signs with (transaction state, left by [`SignStage`]).
#[derive(Debug)]
pub struct SignRequest(pub Arc<Signer>);

/// Signs the spooled message: streams it through the signer (only its header section is held) and
/// returns the `DKIM-Signature:` header line(s), CRLF-terminated.
pub async fn sign_spool(req: &SignRequest, spool: &mut Spool) -> Option<String> {
    if let Err(e) = spool.rewind().await {
        tracing::warn!(error = %e, "cannot read the spooled message to sign it");
        crate::metrics::dkim_signed(SignResult::Error);
        return None;
    }
    let (mut buf, mut pos) = (Vec::new(), 0u64);
    macro_rules! stream {
        ($signer:expr) => {{
            let mut s = $signer.sign_streaming();
            loop {
                match spool.next_chunk(&mut buf, &mut pos).await {
                    Ok(Some(chunk)) => s.write(chunk),
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the spooled message to sign it");
                        crate::metrics::dkim_signed(SignResult::Error);
                        return None;
                    }
                }
            }
            s.finish()
        }};
    }
    let signed = match &*req.0 {
        Signer::Rsa(s) => stream!(s),
        Signer::Ed25519(s) => stream!(s),
    };
    match signed {
        Ok(sig) => {
            crate::metrics::dkim_signed(SignResult::Signed);
            Some(sig.to_header())
        }
        Err(e) => {
            tracing::warn!(error = %e, "DKIM signing failed");
            crate::metrics::dkim_signed(SignResult::Error);
            None
        }
    }
}

/// Picks the key for authenticated submissions by the From header's domain.
pub struct SignStage {
    keys: Arc<Keys>,
}

impl SignStage {
    pub fn new(keys: Arc<Keys>) -> SignStage {
        SignStage { keys }
    }
}

/// The From header's address domain.
fn from_domain(head: &[u8]) -> Option<String> {
    let msg = mail_parser::MessageParser::new().parse_headers(head)?;
    let addr = msg.from()?.first()?.address()?;
    addr.rsplit_once('@').map(|(_, d)| d.to_ascii_lowercase())
}

impl Stage for SignStage {
    fn name(&self) -> &'static str {
        "dkim_sign"
    }

    fn on_end_of_data<'a>(
        &'a self,
        conn: &'a ConnInfo,
        txn: &'a mut TxnContext,
        msg: &'a MessageView<'a>,
    ) -> HookFuture<'a> {
        // Only mail moat can vouch for: an authenticated user, or a submission listener (AUTH required).
        if txn.auth_user.is_some() || conn.role == Role::Submission {
            match from_domain(msg.head).and_then(|d| self.keys.get(&d)) {
                Some(signer) => txn.ext.insert(SignRequest(signer)),
                None => crate::metrics::dkim_signed(SignResult::NoKey),
            }
        }
        proceed()
    }
}

/// Whether `path` holds a key `moat` can sign with (for `moat check`-style diagnostics and tests).
pub fn check_key_file(path: &Path, domain: &str, selector: &str) -> Result<(), DkimError> {
    let c = DkimSignConfig {
        domain: domain.into(),
        selector: selector.into(),
        key_file: path.into(),
        headers: vec!["From".into()],
        oversign: vec![],
    };
    load_signer(&c).map(|_| ())
}
