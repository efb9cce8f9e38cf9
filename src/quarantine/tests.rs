use super::retention::Limits;
use super::*;
use crate::spool::SpoolBudget;

async fn spooled(bytes: &[u8]) -> crate::spool::Spool {
    // A small threshold: the message spills, as a large one does.
    let mut s = SpoolBudget::new(1 << 20, 1024, None).spool();
    for piece in bytes.chunks(1000) {
        s.write(piece).await.unwrap();
    }
    s
}

fn meta(rcpt: &str) -> Meta {
    Meta { mail_from: "a@example.org".into(), rcpts: vec![rcpt.into()], rules: vec!["r1".into()], ..Meta::default() }
}

#[tokio::test]
async fn put_keeps_the_whole_message_and_its_facts() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path().join("q"), "mx.test");
    let msg: Vec<u8> = (0..50_000).flat_map(|i| format!("line {i}\r\n").into_bytes()).collect();
    let id = store.put(meta("b@example.test"), &mut spooled(&msg).await).await.unwrap();
    assert_eq!(std::fs::read(store.message_path(&id)).unwrap(), msg);
    let m = store.get(&id).unwrap();
    assert_eq!(
        (m.size, m.rcpts.as_slice(), m.instance.as_str()),
        (msg.len() as u64, &["b@example.test".to_string()][..], "mx.test")
    );
    assert_eq!(m.sha256, data_encoding::HEXLOWER.encode(ring::digest::digest(&ring::digest::SHA256, &msg).as_ref()));
    assert_eq!(store.list().unwrap(), vec![m]);
    let tmp = std::fs::read_dir(dir.path().join("q/tmp")).unwrap().count();
    assert_eq!(tmp, 0, "nothing left in tmp/");
    assert!(store.delete(&id).unwrap());
    assert!(!store.delete(&id).unwrap());
    assert!(store.list().unwrap().is_empty() && !store.message_path(&id).exists());
    assert!(matches!(store.get("../etc/passwd"), Err(StoreError::BadId(_))));
}

#[tokio::test]
async fn a_failed_write_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("file"), "").unwrap();
    let store = Store::new(dir.path().join("file"), "mx.test");
    assert!(store.put(meta("b@example.test"), &mut spooled(b"x\r\n").await).await.is_err());
}

#[tokio::test]
async fn sweep_expires_by_age_then_budget_and_skips_held_items() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path(), "mx.test");
    let mut ids = Vec::new();
    for i in 0..4 {
        let id = store.put(meta(&format!("r{i}@example.test")), &mut spooled(&[b'x'; 10_000]).await).await.unwrap();
        // Back-date the sidecar's time: item i is (4 - i) days old.
        let mut m = store.get(&id).unwrap();
        m.time = now_secs() - (4 - i) * 86_400;
        std::fs::write(dir.path().join(format!("{id}.json")), serde_json::to_vec(&m).unwrap()).unwrap();
        ids.push(id);
    }
    let size = |id: &str| {
        std::fs::metadata(store.message_path(id)).unwrap().len()
            + std::fs::metadata(dir.path().join(format!("{id}.json"))).unwrap().len()
    };
    let one = size(&ids[3]);
    // ids[2] is held (a release in progress): this sweep skips it.
    let held = store.lock(&ids[2]).unwrap().expect("exists");
    let s = store.sweep(now_secs(), Limits { max_age: 3 * 86_400 + 3600, max_bytes: one + one / 2 }).unwrap();
    assert_eq!((s.expired_age, s.expired_budget), (1, 1), "{s:?}");
    let left: Vec<String> = store.list().unwrap().into_iter().map(|m| m.id).collect();
    assert_eq!(left, [ids[2].clone(), ids[3].clone()], "the held item waits for the next sweep");
    drop(held);
    let s = store.sweep(now_secs(), Limits { max_age: 0, max_bytes: one + one / 2 }).unwrap();
    assert_eq!((s.items, s.expired_budget), (1, 1));
}

#[tokio::test]
async fn items_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path().join("q"), "mx.test");
    let id = store.put(meta("b@example.test"), &mut spooled(b"x\r\n").await).await.unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&store.message_path(&id)), 0o640);
    assert_eq!(mode(&dir.path().join(format!("q/{id}.json"))), 0o640);
    assert_eq!(mode(&dir.path().join("q")), 0o750);
}
