use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::*;

fn sample() -> TransactionRecord<'static> {
    let start = UNIX_EPOCH + Duration::from_millis(1_714_554_187_250);
    TransactionRecord {
        conn_id: "0000002A".into(),
        txn_id: "0000002A.1".into(),
        listener: "mx".into(),
        client_ip: "192.0.2.7".into(),
        client_port: 40000,
        client_name: None,
        helo: Some("client.example".into()),
        tls: Some(TlsRecord { version: "TLSv1.3".into(), cipher: "TLS13_AES_128_GCM_SHA256".into() }),
        mail_from: "a@example.org".into(),
        rcpts: vec![RcptRecord { address: "b@example.net".into(), reply_code: 250, reply_text: "2.1.5 Ok".into() }],
        size: 1234,
        message_id: Some("<m1@example.org>".into()),
        subject_digest: Some(digest("hello")),
        stages: vec![StageRecord {
            stage: "lists".into(),
            phase: "mail".into(),
            verdict: "continue".into(),
            micros: 12,
        }],
        verdict: "accepted".into(),
        reply: ReplyRecord { code: 250, text: "2.0.0 Ok: queued as 4XyZ123".into() },
        upstream: Some(UpstreamRecord {
            code: 250,
            text: "2.0.0 Ok: queued as 4XyZ123".into(),
            queue_id: queue_id_from_reply("2.0.0 Ok: queued as 4XyZ123"),
        }),
        ..TransactionRecord::new(start)
    }
}

#[test]
fn transaction_record_fields() {
    let v: Value = serde_json::to_value(sample()).unwrap();
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    let mut expected = vec![
        "v",
        "type",
        "ts",
        "start",
        "conn_id",
        "txn_id",
        "listener",
        "client_ip",
        "client_port",
        "client_name",
        "helo",
        "tls",
        "auth_user",
        "mail_from",
        "rcpts",
        "size",
        "message_id",
        "subject_digest",
        "stages",
        "verdict",
        "reply",
        "upstream",
        "duration_ms",
    ];
    let mut got = keys.clone();
    got.sort_unstable();
    expected.sort_unstable();
    assert_eq!(got, expected);
    assert_eq!(v["v"], 1);
    assert_eq!(v["type"], "transaction");
    assert_eq!(v["start"], "2024-05-01T09:03:07.250Z");
    assert_eq!(v["client_name"], Value::Null);
    assert_eq!(v["auth_user"], Value::Null);
    assert_eq!(v["tls"], json!({"version": "TLSv1.3", "cipher": "TLS13_AES_128_GCM_SHA256"}));
    assert_eq!(v["rcpts"], json!([{"address": "b@example.net", "reply_code": 250, "reply_text": "2.1.5 Ok"}]));
    assert_eq!(v["stages"], json!([{"stage": "lists", "phase": "mail", "verdict": "continue", "micros": 12}]));
    assert_eq!(v["reply"], json!({"code": 250, "text": "2.0.0 Ok: queued as 4XyZ123"}));
    assert_eq!(v["upstream"]["queue_id"], "4XyZ123");
    assert_eq!(v["subject_digest"], "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");
    assert!(v["duration_ms"].as_u64().unwrap() > 1000, "start was long ago");
    assert!(v["ts"].as_str().unwrap().ends_with('Z'));
}

#[test]
fn auth_record_fields() {
    let rec = AuthRecord {
        conn_id: "1".into(),
        listener: "submission".into(),
        client_ip: "2001:db8::1".into(),
        user: "alice".into(),
        mechanism: "PLAIN".into(),
        result: "failure".into(),
        ..AuthRecord::new()
    };
    let v: Value = serde_json::to_value(&rec).unwrap();
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["client_ip", "conn_id", "listener", "mechanism", "result", "ts", "type", "user", "v"]);
    assert_eq!(v["type"], "auth");
    assert_eq!(v["v"], 1);
}

#[test]
fn rfc3339_formatting() {
    let at = |ms: u64| rfc3339(UNIX_EPOCH + Duration::from_millis(ms));
    assert_eq!(at(0), "1970-01-01T00:00:00.000Z");
    assert_eq!(at(951_782_400_000), "2000-02-29T00:00:00.000Z");
    assert_eq!(at(1_709_251_199_999), "2024-02-29T23:59:59.999Z");
    assert_eq!(at(4_102_444_800_000), "2100-01-01T00:00:00.000Z");
    assert_eq!(rfc3339(UNIX_EPOCH - Duration::from_secs(5)), "1970-01-01T00:00:00.000Z");
}

#[test]
fn queue_ids() {
    assert_eq!(queue_id_from_reply("2.0.0 Ok: queued as 4XyZ123").as_deref(), Some("4XyZ123"));
    assert_eq!(queue_id_from_reply("2.0.0 Ok: Queued as 4Vq1Tk3kQbz1xyZ").as_deref(), Some("4Vq1Tk3kQbz1xyZ"));
    assert_eq!(queue_id_from_reply("OK id=1uAbCd-000123-Xy").as_deref(), Some("1uAbCd-000123-Xy"));
    assert_eq!(queue_id_from_reply("2.0.0 Ok: queued as ABC123 (more)").as_deref(), Some("ABC123"));
    assert_eq!(queue_id_from_reply("2.0.0 Ok"), None);
    assert_eq!(queue_id_from_reply("2.0.0 Ok: queued as "), None);
    assert_eq!(queue_id_from_reply("queued as ünïcode"), None);
}

#[test]
fn newlines_in_values_stay_escaped() {
    let rec = TransactionRecord { helo: Some("evil\r\n{\"v\":2}".into()), ..TransactionRecord::default() };
    let line = serde_json::to_string(&rec).unwrap();
    assert!(!line.contains('\n') && !line.contains('\r'), "{line}");
}

async fn wait_for_lines(path: &Path, n: usize) -> Vec<Value> {
    for _ in 0..500 {
        if let Ok(text) = tokio::fs::read_to_string(path).await {
            let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
            if lines.len() >= n {
                return lines;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} never got {n} lines", path.display());
}

#[tokio::test]
async fn file_destination_receives_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let sink = AuditSink::start(AuditDestination::File(path.clone()), 16, CancellationToken::new());
    sink.record(&sample());
    sink.record(&AuthRecord { user: "bob".into(), result: "success".into(), ..AuthRecord::new() });
    let lines = wait_for_lines(&path, 2).await;
    assert_eq!(lines[0]["type"], "transaction");
    assert_eq!(lines[0]["mail_from"], "a@example.org");
    assert_eq!(lines[1]["type"], "auth");
    let mode = std::os::unix::fs::PermissionsExt::mode(&tokio::fs::metadata(&path).await.unwrap().permissions());
    assert_eq!(mode & 0o777, 0o640);
    sink.close().await;
    assert_eq!(sink.dropped(), 0);
}

#[tokio::test]
async fn reopen_after_rename_writes_the_new_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let rotated = dir.path().join("audit.log.1");
    let sink = AuditSink::start(AuditDestination::File(path.clone()), 16, CancellationToken::new());
    sink.record(&TransactionRecord { txn_id: "before".into(), ..TransactionRecord::default() });
    wait_for_lines(&path, 1).await;
    tokio::fs::rename(&path, &rotated).await.unwrap();
    sink.reopen();
    // The reopen is asked for before the record is queued, and the writer handles reopens first.
    sink.record(&TransactionRecord { txn_id: "after".into(), ..TransactionRecord::default() });
    sink.close().await;
    let old = wait_for_lines(&rotated, 1).await;
    let new = wait_for_lines(&path, 1).await;
    assert_eq!((old.len(), old[0]["txn_id"].as_str()), (1, Some("before")));
    assert_eq!((new.len(), new[0]["txn_id"].as_str()), (1, Some("after")));
}

#[tokio::test]
async fn sigusr1_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let rotated = dir.path().join("audit.log.1");
    let sink = AuditSink::start(AuditDestination::File(path.clone()), 16, CancellationToken::new());
    sink.record(&TransactionRecord { txn_id: "one".into(), ..TransactionRecord::default() });
    wait_for_lines(&path, 1).await;
    tokio::fs::rename(&path, &rotated).await.unwrap();
    // `start` registered the SIGUSR1 handler before returning, so the signal cannot kill the test process.
    let status = std::process::Command::new("kill").args(["-USR1", &std::process::id().to_string()]).status().unwrap();
    assert!(status.success());
    // The new file appears once the writer has handled the signal.
    for _ in 0..500 {
        if tokio::fs::metadata(&path).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sink.record(&TransactionRecord { txn_id: "two".into(), ..TransactionRecord::default() });
    let new = wait_for_lines(&path, 1).await;
    assert_eq!(new[0]["txn_id"], "two");
    sink.close().await;
}

#[tokio::test]
async fn full_queue_drops_and_counts() {
    let handle = crate::metrics::install().unwrap();
    // A queue nobody reads: the writer is "stuck".
    let (sink, _rx, _control) = AuditSink::queue(2);
    let before = dropped_metric(&handle.render());
    for _ in 0..5 {
        sink.record(&AuthRecord::new());
    }
    assert_eq!(sink.dropped(), 3);
    assert!(dropped_metric(&handle.render()) >= before + 3);
}

fn dropped_metric(text: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix("moat_audit_records_dropped_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn shutdown_drains_then_stops() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let shutdown = CancellationToken::new();
    let sink = AuditSink::start(AuditDestination::File(path.clone()), 64, shutdown.clone());
    for i in 0..20 {
        sink.record(&TransactionRecord { txn_id: i.to_string().into(), ..TransactionRecord::default() });
    }
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), sink.closed()).await.unwrap();
    let lines = wait_for_lines(&path, 20).await;
    assert_eq!(lines.len(), 20);
    assert_eq!(lines[19]["txn_id"], "19");
    // After the writer ended, records are dropped, not queued forever.
    sink.record(&AuthRecord::new());
    assert_eq!(sink.dropped(), 1);
}

#[tokio::test]
async fn off_does_nothing() {
    let sink = AuditSink::start(AuditDestination::Off, 1, CancellationToken::new());
    for _ in 0..10 {
        sink.record(&AuthRecord::new());
    }
    assert_eq!(sink.dropped(), 0);
    sink.close().await;
    sink.closed().await;
}

#[tokio::test]
async fn unwritable_file_drops_without_blocking() {
    let sink =
        AuditSink::start(AuditDestination::File("/nonexistent-dir/audit.log".into()), 16, CancellationToken::new());
    sink.record(&AuthRecord::new());
    sink.close().await;
    assert_eq!(sink.dropped(), 1);
}
