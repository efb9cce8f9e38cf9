//! TOTP (RFC 6238): HMAC-SHA-1, 30-second steps, 6 digits, one step of clock skew either way. Pure: the
//! caller passes the time and keeps the last step used per user, so a code is never accepted twice.

use ring::hmac;

/// Seconds per step.
pub const STEP: u64 = 30;
/// Digits per code.
pub const DIGITS: usize = 6;

/// The HOTP value (RFC 4226 5.3) of `secret` at `counter`, truncated to [`DIGITS`] digits.
pub fn code_at(secret: &[u8], counter: u64) -> u32 {
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret);
    let tag = hmac::sign(&key, &counter.to_be_bytes());
    let h = tag.as_ref();
    let off = usize::from(h[h.len() - 1] & 0x0f);
    let bin = u32::from_be_bytes([h[off] & 0x7f, h[off + 1], h[off + 2], h[off + 3]]);
    bin % 10u32.pow(DIGITS as u32)
}

/// The code for unix time `now`, as the 6-digit string a user types.
pub fn code_now(secret: &[u8], now: u64) -> String {
    format!("{:06}", code_at(secret, now / STEP))
}

/// Checks `code` against the steps around `now`; returns the matching step if it is later than
/// `last_used` (a code, or an older one, is never accepted twice).
pub fn verify(secret: &[u8], code: &str, now: u64, last_used: Option<u64>) -> Option<u64> {
    if code.len() != DIGITS || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let given: u32 = code.parse().ok()?;
    let now_step = now / STEP;
    let mut matched = None;
    // Check every candidate (no early return) so the time taken does not depend on which step matched.
    for step in [now_step.saturating_sub(1), now_step, now_step + 1] {
        if ring_eq(code_at(secret, step), given) {
            matched = Some(step);
        }
    }
    matched.filter(|s| last_used.is_none_or(|l| *s > l))
}

fn ring_eq(a: u32, b: u32) -> bool {
    (a ^ b) == 0
}

/// Decodes a base32 secret (RFC 4648, case-insensitive, padding and spaces optional).
pub fn decode_secret(s: &str) -> Option<Vec<u8>> {
    let mut clean: String = s.chars().filter(|c| !c.is_whitespace() && *c != '=').collect();
    clean.make_ascii_uppercase();
    let secret = data_encoding::BASE32_NOPAD.decode(clean.as_bytes()).ok()?;
    (secret.len() >= 10).then_some(secret)
}

/// Encodes a secret as unpadded base32, as authenticator apps expect.
pub fn encode_secret(secret: &[u8]) -> String {
    data_encoding::BASE32_NOPAD.encode(secret)
}

/// The `otpauth://` URI for an authenticator app (the de-facto Key Uri Format).
pub fn otpauth_uri(issuer: &str, user: &str, secret: &[u8]) -> String {
    let enc = |s: &str| -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'@' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect()
    };
    format!(
        "otpauth://totp/{}:{}?secret={}&issuer={}&algorithm=SHA1&digits={DIGITS}&period={STEP}",
        enc(issuer),
        enc(user),
        encode_secret(secret),
        enc(issuer)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const RFC_SECRET: &[u8] = b"12345678901234567890";

    #[test]
    fn rfc6238_vectors() {
        // RFC 6238 appendix B (SHA-1), last 6 of the 8 digits.
        for (t, want) in
            [(59u64, 287_082u32), (1_111_111_109, 81_804), (1_234_567_890, 5_924), (2_000_000_000, 279_037)]
        {
            assert_eq!(code_at(RFC_SECRET, t / STEP), want, "t={t}");
        }
        assert_eq!(code_now(RFC_SECRET, 1_234_567_890), "005924");
    }

    #[test]
    fn skew_and_reuse() {
        let now = 1_700_000_000;
        let code = code_now(RFC_SECRET, now);
        let step = now / STEP;
        assert_eq!(verify(RFC_SECRET, &code, now, None), Some(step));
        assert_eq!(verify(RFC_SECRET, &code, now + STEP, None), Some(step), "one step late is fine");
        assert_eq!(verify(RFC_SECRET, &code, now + 2 * STEP, None), None, "two steps late is not");
        assert_eq!(verify(RFC_SECRET, &code, now, Some(step)), None, "reused");
        let older = code_now(RFC_SECRET, now - STEP);
        assert_eq!(verify(RFC_SECRET, &older, now, Some(step)), None, "older than the last used");
        for bad in ["", "12345", "1234567", "12a456", "+12345"] {
            assert_eq!(verify(RFC_SECRET, bad, now, None), None, "{bad:?}");
        }
    }

    #[test]
    fn secrets_and_uri() {
        let s = encode_secret(RFC_SECRET);
        assert_eq!(decode_secret(&s.to_lowercase()), Some(RFC_SECRET.to_vec()));
        assert_eq!(decode_secret("GEZD GNBV GY3T QOJQ GEZD GNBV GY3T QOJQ"), Some(RFC_SECRET.to_vec()));
        assert_eq!(decode_secret("not base32 !"), None);
        assert_eq!(decode_secret("GEZDGNBV"), None, "too short");
        let uri = otpauth_uri("moat", "alice@example.test", RFC_SECRET);
        assert!(uri.starts_with("otpauth://totp/moat:alice@example.test?secret=GEZDGNBV"), "{uri}");
    }
}
