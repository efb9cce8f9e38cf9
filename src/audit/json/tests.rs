use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

use super::*;

/// Strings that exercise every escape: quotes, backslashes, each control character, DEL, non-ASCII.
fn odd_string() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9@.<> -]{0,12}",
        "[\"\\\\\\x00-\\x1f\\x7f]{0,8}",
        any::<String>(),
        vec(
            prop_oneof![
                Just('"'),
                Just('\\'),
                Just('é'),
                Just('\u{2028}'),
                Just('😀'),
                (0u8..0x20).prop_map(char::from)
            ],
            0..10
        )
        .prop_map(|c| c.into_iter().collect()),
    ]
}

fn tls() -> impl Strategy<Value = TlsRecord> {
    (odd_string(), odd_string()).prop_map(|(version, cipher)| TlsRecord { version, cipher })
}

fn rcpt() -> impl Strategy<Value = RcptRecord<'static>> {
    (odd_string(), any::<u16>(), odd_string()).prop_map(|(address, reply_code, reply_text)| RcptRecord {
        address: address.into(),
        reply_code,
        reply_text,
    })
}

fn stage() -> impl Strategy<Value = StageRecord> {
    (odd_string(), odd_string(), odd_string(), any::<u64>()).prop_map(|(stage, phase, verdict, micros)| StageRecord {
        stage: stage.into(),
        phase: phase.into(),
        verdict: verdict.into(),
        micros,
    })
}

fn upstream() -> impl Strategy<Value = UpstreamRecord> {
    (any::<u16>(), odd_string(), option::of(odd_string())).prop_map(|(code, text, queue_id)| UpstreamRecord {
        code,
        text,
        queue_id,
    })
}

prop_compose! {
    fn transaction()(
        v in any::<u32>(),
        strings in vec(odd_string(), 9),
        client_port in any::<u16>(),
        optional in vec(option::of(odd_string()), 5),
        tls in option::of(tls()),
        rcpts in vec(rcpt(), 0..4),
        size in any::<u64>(),
        stages in vec(stage(), 0..4),
        reply in (any::<u16>(), odd_string()),
        upstream in option::of(upstream()),
        duration_ms in any::<u64>(),
        record_type in prop_oneof![Just("transaction"), Just("odd \"type\"\n")],
    ) -> TransactionRecord<'static> {
        let mut s = strings.into_iter();
        let mut o = optional.into_iter();
        TransactionRecord {
            v,
            record_type,
            ts: s.next().unwrap(),
            start: s.next().unwrap(),
            conn_id: s.next().unwrap().into(),
            txn_id: s.next().unwrap().into(),
            listener: s.next().unwrap().into(),
            client_ip: s.next().unwrap(),
            client_port,
            client_name: o.next().unwrap().map(Into::into),
            helo: o.next().unwrap().map(Into::into),
            tls,
            auth_user: o.next().unwrap().map(Into::into),
            mail_from: s.next().unwrap().into(),
            rcpts,
            size,
            message_id: o.next().unwrap(),
            subject_digest: o.next().unwrap(),
            stages,
            verdict: s.next().unwrap().into(),
            reply: ReplyRecord { code: reply.0, text: reply.1 },
            upstream,
            duration_ms,
        }
    }
}

fn json(rec: &impl JsonLine) -> String {
    let mut out = Vec::new();
    rec.write_json(&mut out);
    String::from_utf8(out).unwrap()
}

#[test]
fn every_control_character() {
    for b in 0u8..=0x7f {
        let s = format!("a{}b", char::from(b));
        let mut out = Vec::new();
        push_str(&mut out, &s);
        assert_eq!(out, serde_json::to_vec(&s).unwrap(), "byte {b:#x}");
    }
}

#[test]
fn defaults_match_serde() {
    let rec = TransactionRecord::default();
    assert_eq!(json(&rec), serde_json::to_string(&rec).unwrap());
    let rec = AuthRecord::new();
    assert_eq!(json(&rec), serde_json::to_string(&rec).unwrap());
}

proptest! {
    #[test]
    fn transaction_matches_serde(rec in transaction()) {
        prop_assert_eq!(json(&rec), serde_json::to_string(&rec).unwrap());
    }

    #[test]
    fn auth_matches_serde(strings in vec(odd_string(), 7), v in any::<u32>()) {
        let mut s = strings.into_iter();
        let rec = AuthRecord {
            v,
            record_type: "auth",
            ts: s.next().unwrap(),
            conn_id: s.next().unwrap(),
            listener: s.next().unwrap(),
            client_ip: s.next().unwrap(),
            user: s.next().unwrap(),
            mechanism: s.next().unwrap(),
            result: s.next().unwrap(),
        };
        prop_assert_eq!(json(&rec), serde_json::to_string(&rec).unwrap());
    }

    #[test]
    fn integers_match_serde(n in any::<u64>()) {
        let mut out = Vec::new();
        push_uint(&mut out, n);
        prop_assert_eq!(out, serde_json::to_vec(&n).unwrap());
    }
}
