//! The audit records as JSON lines, written by hand: byte for byte what `serde_json::to_vec` makes of their
//! `Serialize` derives (field order, `null` for `None`, serde_json's string escapes), without its generic
//! machinery. One record per relayed message is written here, so it is on the per-message path.
//!
//! The derives stay: they are the schema's reference, and the tests compare this writer against them.

use super::record::{AuthRecord, RcptRecord, ReplyRecord, StageRecord, TlsRecord, TransactionRecord, UpstreamRecord};

/// A record that can be written as one JSON object (no newline).
pub trait JsonLine {
    /// Appends the record's JSON object to `out`.
    fn write_json(&self, out: &mut Vec<u8>);

    /// About how many bytes the object takes, to size the buffer once.
    fn size_hint(&self) -> usize {
        512
    }
}

// === impl JsonLine ===

impl JsonLine for TransactionRecord<'_> {
    fn write_json(&self, out: &mut Vec<u8>) {
        let mut o = Object::open(out);
        o.uint("v", u64::from(self.v));
        o.str("type", self.record_type);
        o.str("ts", &self.ts);
        o.str("start", &self.start);
        o.str("conn_id", &self.conn_id);
        o.str("txn_id", &self.txn_id);
        o.str("listener", &self.listener);
        o.str("client_ip", &self.client_ip);
        o.uint("client_port", u64::from(self.client_port));
        o.opt_str("client_name", self.client_name.as_deref());
        o.opt_str("helo", self.helo.as_deref());
        o.key("tls");
        match &self.tls {
            Some(t) => t.write_json(o.out),
            None => o.out.extend_from_slice(b"null"),
        }
        o.opt_str("auth_user", self.auth_user.as_deref());
        o.str("mail_from", &self.mail_from);
        o.array("rcpts", &self.rcpts);
        o.uint("size", self.size);
        o.opt_str("message_id", self.message_id.as_deref());
        o.opt_str("subject_digest", self.subject_digest.as_deref());
        o.array("stages", &self.stages);
        o.str("verdict", &self.verdict);
        o.key("reply");
        self.reply.write_json(o.out);
        o.key("upstream");
        match &self.upstream {
            Some(u) => u.write_json(o.out),
            None => o.out.extend_from_slice(b"null"),
        }
        o.uint("duration_ms", self.duration_ms);
        o.close();
    }

    fn size_hint(&self) -> usize {
        let strings: usize = self.rcpts.iter().map(|r| r.address.len() + r.reply_text.len()).sum::<usize>()
            + self.stages.iter().map(|s| s.stage.len() + s.phase.len() + s.verdict.len()).sum::<usize>()
            + self.mail_from.len()
            + self.reply.text.len()
            + self.upstream.as_ref().map_or(0, |u| u.text.len());
        // Keys and the fixed-size fields take about 500 bytes, each recipient and stage about 60 more.
        512 + strings + 64 * (self.rcpts.len() + self.stages.len())
    }
}

impl JsonLine for TlsRecord {
    fn write_json(&self, out: &mut Vec<u8>) {
        let mut o = Object::open(out);
        o.str("version", &self.version);
        o.str("cipher", &self.cipher);
        o.close();
    }
}

impl JsonLine for RcptRecord<'_> {
    fn write_json(&self, out: &mut Vec<u8>) {
        let mut o = Object::open(out);
        o.str("address", &self.address);
        o.uint("reply_code", u64::from(self.reply_code));
        o.str("reply_text", &self.reply_text);
        o.close();
    }
}

impl JsonLine for StageRecord {
    fn write_json(&self, out: &mut Vec<u8>) {
        let mut o = Object::open(out);
        o.str("stage", &self.stage);
        o.str("phase", &self.phase);
        o.str("verdict", &self.verdict);
        o.uint("micros", self.micros);
        o.close();
    }
}

impl JsonLine for ReplyRecord {
    fn write_json(&self, out: &mut Vec<u8>) {
        let mut o = Object::open(out);
        o.uint("code", u64::from(self.code));
        o.str("text", &self.text);
        o.close();
    }
}

impl JsonLine for UpstreamRecord {
    fn write_json(&self, out: &mut Vec<u8>) {
        let mut o = Object::open(out);
        o.uint("code", u64::from(self.code));
        o.str("text", &self.text);
        o.opt_str("queue_id", self.queue_id.as_deref());
        o.close();
    }
}

impl JsonLine for AuthRecord {
    fn write_json(&self, out: &mut Vec<u8>) {
        let mut o = Object::open(out);
        o.uint("v", u64::from(self.v));
        o.str("type", self.record_type);
        o.str("ts", &self.ts);
        o.str("conn_id", &self.conn_id);
        o.str("listener", &self.listener);
        o.str("client_ip", &self.client_ip);
        o.str("user", &self.user);
        o.str("mechanism", &self.mechanism);
        o.str("result", &self.result);
        o.close();
    }
}

// === impl Object ===

/// A JSON object being written: `{`, then `"key":value` pairs separated by commas, then `}` (serde_json's
/// compact format, no spaces).
struct Object<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> Object<'a> {
    fn open(out: &'a mut Vec<u8>) -> Object<'a> {
        out.push(b'{');
        Object { out, first: true }
    }

    /// Writes the key of the next pair, and the comma before it. Keys here are plain ASCII names.
    fn key(&mut self, key: &str) {
        if !std::mem::take(&mut self.first) {
            self.out.push(b',');
        }
        self.out.push(b'"');
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    fn str(&mut self, key: &str, value: &str) {
        self.key(key);
        push_str(self.out, value);
    }

    fn opt_str(&mut self, key: &str, value: Option<&str>) {
        self.key(key);
        match value {
            Some(v) => push_str(self.out, v),
            None => self.out.extend_from_slice(b"null"),
        }
    }

    fn uint(&mut self, key: &str, value: u64) {
        self.key(key);
        push_uint(self.out, value);
    }

    fn array<T: JsonLine>(&mut self, key: &str, items: &[T]) {
        self.key(key);
        self.out.push(b'[');
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                self.out.push(b',');
            }
            item.write_json(self.out);
        }
        self.out.push(b']');
    }

    fn close(self) {
        self.out.push(b'}');
    }
}

// === helpers ===

/// A JSON string with serde_json's escapes: `"` and `\` by a backslash, the control characters below 0x20
/// as `\b \t \n \f \r` or `\u00XX` (lower-case hex); everything else, DEL and non-ASCII included, as is.
fn push_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    out.push(b'"');
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        // One table load per byte for the common case (nothing to escape), as serde_json does.
        if !NEEDS_ESCAPE[usize::from(b)] {
            continue;
        }
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0x08 => b"\\b",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            0x0c => b"\\f",
            b'\r' => b"\\r",
            0x00..=0x1f => &[b'\\', b'u', b'0', b'0', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]],
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(escape);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// The bytes JSON strings must escape: control characters, `"` and `\`.
static NEEDS_ESCAPE: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = true;
        b += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

/// An unsigned integer in decimal.
fn push_uint(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

#[cfg(test)]
mod tests;
