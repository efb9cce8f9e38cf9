//! The names of the files in a zip archive, read by hand from its central directory, for the
//! `attachment_name`, `attachment_ext`, `attachment_type` and `archive_unreadable` conditions.
//!
//! Only names are needed, so nothing is decompressed and the `zip` crate (and its compiler demands) is not
//! used. The input is whatever part of the attachment is in memory, possibly cut by the scan window or
//! made by an attacker: every offset is checked, the work is bounded by [`MAX_ENTRIES`] and [`MAX_HEADERS`],
//! and a damaged archive is not an error, it yields the names that could be read and `complete = false`.
//!
//! Layout (APPNOTE.TXT §4.3): local file headers and data, then the central directory (one 46-byte header
//! plus name, extra field and comment per entry), then the end of central directory record (22 bytes plus
//! a comment of up to 64 KiB), whose fields say where the directory starts and how many entries it has.

use memchr::memmem;

/// The most file names listed from one archive. Real mail attachments list a few dozen files; 1,000 bounds
/// the memory on an archive made of nothing but tiny entries. Directory entries and entries without a
/// name do not count: 1,000 of them must not hide the program after them.
pub const MAX_ENTRIES: usize = 1000;
/// The most headers (named or not) read from one archive: bounds the work on an archive of empty entries.
/// A central directory header is at least 46 bytes, so this is at most 3 MB of directory, about a
/// millisecond of reading.
pub const MAX_HEADERS: usize = 64 * MAX_ENTRIES;

/// End of central directory record: signature and fixed length (APPNOTE §4.3.16).
const EOCD_SIG: &[u8] = b"PK\x05\x06";
const EOCD_LEN: usize = 22;
/// The archive comment after the EOCD record is at most this long, so the record is in the last
/// `EOCD_LEN + MAX_COMMENT` bytes.
const MAX_COMMENT: usize = 0xffff;
/// A comment can contain the EOCD signature; at most this many candidates are tried, from the end.
const MAX_EOCD_CANDIDATES: usize = 16;
/// Central directory file header (APPNOTE §4.3.12).
const CDH_SIG: &[u8] = b"PK\x01\x02";
const CDH_LEN: usize = 46;
/// Local file header (APPNOTE §4.3.7).
const LFH_SIG: &[u8] = b"PK\x03\x04";
const LFH_LEN: usize = 30;
/// Zip64 end of central directory locator and record (APPNOTE §4.3.14, §4.3.15).
const ZIP64_LOCATOR_SIG: &[u8] = b"PK\x06\x07";
const ZIP64_LOCATOR_LEN: usize = 20;
const ZIP64_EOCD_SIG: &[u8] = b"PK\x06\x06";
const ZIP64_EOCD_LEN: usize = 56;
/// General purpose flags: bit 0 encrypted, bit 3 sizes in a data descriptor after the data.
const FLAG_ENCRYPTED: usize = 1;
const FLAG_DATA_DESCRIPTOR: usize = 1 << 3;

/// What could be read of an archive's table of contents.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Listing {
    /// Entry paths as stored (`dir/file.exe`), directories left out. Names are UTF-8 or CP437; CP437
    /// bytes past ASCII read as U+FFFD, which keeps every ASCII extension intact.
    pub paths: Vec<String>,
    /// The central directory was found and read to its last entry within [`MAX_ENTRIES`] and [`MAX_HEADERS`].
    pub complete: bool,
    /// Some entry is encrypted (its data, not its name: zip encryption leaves names readable).
    pub encrypted: bool,
}

/// Lists the entries of a zip archive held (wholly or partly) in `bytes`. Never fails: without a
/// readable central directory (a truncated archive), the local file headers from the start are walked
/// instead as far as they lead, and `complete` is false.
pub fn list(bytes: &[u8]) -> Listing {
    let mut listing = Listing::default();
    match find_directory(bytes) {
        Some(dir) => listing.complete = read_directory(bytes, &dir, &mut listing),
        None => walk_local_headers(bytes, &mut listing),
    }
    listing
}

/// Where the central directory starts and how many entries it declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Directory {
    start: usize,
    entries: u64,
}

fn le16(b: &[u8], at: usize) -> Option<usize> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_le_bytes([s[0], s[1]]) as usize)
}

fn le32(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u64::from(u32::from_le_bytes([s[0], s[1], s[2], s[3]])))
}

fn le64(b: &[u8], at: usize) -> Option<u64> {
    let s: [u8; 8] = b.get(at..at.checked_add(8)?)?.try_into().ok()?;
    Some(u64::from_le_bytes(s))
}

fn has_sig(b: &[u8], at: usize, sig: &[u8]) -> bool {
    at.checked_add(sig.len()).and_then(|end| b.get(at..end)) == Some(sig)
}

/// Searches the end of `bytes` for an EOCD record whose directory checks out, newest first.
fn find_directory(bytes: &[u8]) -> Option<Directory> {
    let lowest = bytes.len().saturating_sub(EOCD_LEN + MAX_COMMENT);
    let tail = &bytes[lowest..];
    memmem::rfind_iter(tail, EOCD_SIG).take(MAX_EOCD_CANDIDATES).find_map(|i| directory_at(bytes, lowest + i))
}

/// The directory an EOCD record at `eocd` describes, if its first entry is where the record says. An
/// archive with data prepended (a self-extractor, a polyglot) has offsets shifted by that data, so the
/// position just before the EOCD record, minus the directory's size, is tried as well.
fn directory_at(bytes: &[u8], eocd: usize) -> Option<Directory> {
    let entries = le16(bytes, eocd + 10)? as u64;
    let size = le32(bytes, eocd + 12)?;
    let offset = le32(bytes, eocd + 16)?;
    if entries == 0xffff || size == 0xffff_ffff || offset == 0xffff_ffff {
        return zip64_directory(bytes, eocd);
    }
    directory_from(bytes, entries, size, offset, eocd)
}

/// The first of the two candidate starts (stated offset, or `end - size`) that holds a directory header.
fn directory_from(bytes: &[u8], entries: u64, size: u64, offset: u64, end: usize) -> Option<Directory> {
    let stated = usize::try_from(offset).ok();
    let before_end = usize::try_from(size).ok().and_then(|s| end.checked_sub(s));
    [stated, before_end]
        .into_iter()
        .flatten()
        .find(|&start| entries == 0 || has_sig(bytes, start, CDH_SIG))
        .map(|start| Directory { start, entries })
}

/// Zip64: the locator just before the EOCD record points at the zip64 record with 64-bit fields.
fn zip64_directory(bytes: &[u8], eocd: usize) -> Option<Directory> {
    let locator = eocd.checked_sub(ZIP64_LOCATOR_LEN)?;
    if !has_sig(bytes, locator, ZIP64_LOCATOR_SIG) {
        return None;
    }
    let stated = usize::try_from(le64(bytes, locator + 8)?).ok();
    let record = [stated, locator.checked_sub(ZIP64_EOCD_LEN)]
        .into_iter()
        .flatten()
        .find(|&at| has_sig(bytes, at, ZIP64_EOCD_SIG))?;
    let entries = le64(bytes, record + 32)?;
    let size = le64(bytes, record + 40)?;
    let offset = le64(bytes, record + 48)?;
    directory_from(bytes, entries, size, offset, record)
}

/// Reads the directory's entries into `listing`; true when every declared entry was read.
fn read_directory(bytes: &[u8], dir: &Directory, listing: &mut Listing) -> bool {
    let mut at = dir.start;
    for n in 0..dir.entries {
        if n >= MAX_HEADERS as u64 {
            return false;
        }
        match directory_entry(bytes, at) {
            Some((name, flags, next)) if add(listing, name, flags) => at = next,
            _ => return false,
        }
    }
    true
}

/// One central directory header at `at`: (name, flags, offset of the next header).
fn directory_entry(bytes: &[u8], at: usize) -> Option<(&[u8], usize, usize)> {
    if !has_sig(bytes, at, CDH_SIG) {
        return None;
    }
    let flags = le16(bytes, at + 8)?;
    let name_len = le16(bytes, at + 28)?;
    let extra_len = le16(bytes, at + 30)?;
    let comment_len = le16(bytes, at + 32)?;
    let name = bytes.get(at + CDH_LEN..at + CDH_LEN + name_len)?;
    Some((name, flags, at + CDH_LEN + name_len + extra_len + comment_len))
}

/// The fallback for an archive without its end: local headers one after the other from offset 0, until
/// one is missing or its data's size is unknown (written after the data, flag bit 3) or zip64.
fn walk_local_headers(bytes: &[u8], listing: &mut Listing) {
    let mut at = 0usize;
    for _ in 0..MAX_HEADERS {
        let Some((name, flags, compressed)) = local_entry(bytes, at) else { return };
        if !add(listing, name, flags) {
            return;
        }
        let unknown_size = flags & FLAG_DATA_DESCRIPTOR != 0 && compressed == 0;
        if unknown_size || compressed == 0xffff_ffff {
            return;
        }
        let next = usize::try_from(compressed)
            .ok()
            .and_then(|c| (at + LFH_LEN + name.len()).checked_add(le16(bytes, at + 28)?)?.checked_add(c));
        match next {
            Some(n) => at = n,
            None => return,
        }
    }
}

/// One local file header at `at`: (name, flags, compressed size).
fn local_entry(bytes: &[u8], at: usize) -> Option<(&[u8], usize, u64)> {
    if !has_sig(bytes, at, LFH_SIG) {
        return None;
    }
    let flags = le16(bytes, at + 6)?;
    let compressed = le32(bytes, at + 18)?;
    let name_len = le16(bytes, at + 26)?;
    le16(bytes, at + 28)?;
    let name = bytes.get(at + LFH_LEN..at + LFH_LEN + name_len)?;
    Some((name, flags, compressed))
}

/// Records one entry; false when it is a file past [`MAX_ENTRIES`] (the listing is then incomplete).
fn add(listing: &mut Listing, name: &[u8], flags: usize) -> bool {
    listing.encrypted |= flags & FLAG_ENCRYPTED != 0;
    if name.is_empty() || name.ends_with(b"/") || name.ends_with(b"\\") {
        return true;
    }
    if listing.paths.len() >= MAX_ENTRIES {
        return false;
    }
    listing.paths.push(String::from_utf8_lossy(name).into_owned());
    true
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A stored (uncompressed) zip archive of `files`, as any zip tool writes it, with `prefix` bytes
    /// before it (a self-extractor stub) and `comment` after the EOCD record.
    pub(crate) fn archive_with(files: &[(&str, &[u8])], prefix: &[u8], comment: &[u8], flags: u16) -> Vec<u8> {
        let mut out = prefix.to_vec();
        let mut central = Vec::new();
        for (name, data) in files {
            let offset = (out.len() - prefix.len()) as u32;
            out.extend_from_slice(LFH_SIG);
            out.extend_from_slice(&[20, 0]);
            out.extend_from_slice(&flags.to_le_bytes());
            out.extend_from_slice(&[0; 10]); // method, time, date, crc
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(data);
            central.extend_from_slice(CDH_SIG);
            central.extend_from_slice(&[20, 0, 20, 0]);
            central.extend_from_slice(&flags.to_le_bytes());
            central.extend_from_slice(&[0; 10]);
            central.extend_from_slice(&(data.len() as u32).to_le_bytes());
            central.extend_from_slice(&(data.len() as u32).to_le_bytes());
            central.extend_from_slice(&(name.len() as u16).to_le_bytes());
            central.extend_from_slice(&[0; 12]); // extra, comment, disk, attributes
            central.extend_from_slice(&offset.to_le_bytes());
            central.extend_from_slice(name.as_bytes());
        }
        let cd_offset = (out.len() - prefix.len()) as u32;
        out.extend_from_slice(&central);
        out.extend_from_slice(EOCD_SIG);
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&(files.len() as u16).to_le_bytes());
        out.extend_from_slice(&(files.len() as u16).to_le_bytes());
        out.extend_from_slice(&(central.len() as u32).to_le_bytes());
        out.extend_from_slice(&cd_offset.to_le_bytes());
        out.extend_from_slice(&(comment.len() as u16).to_le_bytes());
        out.extend_from_slice(comment);
        out
    }

    pub(crate) fn archive(files: &[(&str, &[u8])]) -> Vec<u8> {
        archive_with(files, b"", b"", 0)
    }

    fn names(l: &Listing) -> Vec<&str> {
        l.paths.iter().map(String::as_str).collect()
    }

    #[test]
    fn lists_the_central_directory() {
        let z = archive(&[("docs/", b""), ("docs/invoice.pdf.exe", b"MZ..."), ("readme.txt", b"hello")]);
        let l = list(&z);
        assert_eq!(names(&l), ["docs/invoice.pdf.exe", "readme.txt"]);
        assert!(l.complete && !l.encrypted);
    }

    #[test]
    fn empty_archive_is_complete() {
        let l = list(&archive(&[]));
        assert!(l.complete && l.paths.is_empty(), "{l:?}");
    }

    #[test]
    fn comment_with_a_fake_eocd_and_a_prefix_are_handled() {
        let mut fake = EOCD_SIG.to_vec();
        fake.extend_from_slice(&[0xff; 18]);
        let z = archive_with(&[("a.exe", b"x")], b"MZ self-extractor stub", &fake, 0);
        let l = list(&z);
        assert_eq!(names(&l), ["a.exe"]);
        assert!(l.complete);
    }

    #[test]
    fn encrypted_entries_are_noticed() {
        let l = list(&archive_with(&[("secret.exe", b"x")], b"", b"", 1));
        assert!(l.encrypted && l.complete);
        assert_eq!(names(&l), ["secret.exe"]);
    }

    #[test]
    fn truncated_archive_yields_local_names() {
        let z = archive(&[("one.txt", b"11111"), ("two.exe", b"22222"), ("three.js", b"33333")]);
        // Cut inside the third entry's data: no directory; the first names come from local headers.
        let cut = z.iter().position(|&b| b == b'3').unwrap() + 2;
        let l = list(&z[..cut]);
        assert_eq!(names(&l), ["one.txt", "two.exe", "three.js"]);
        assert!(!l.complete);
        // Cut inside the second header's name.
        let cut = memmem::find(&z, b"two.").unwrap() + 2;
        let l = list(&z[..cut]);
        assert_eq!(names(&l), ["one.txt"]);
        assert!(!l.complete);
    }

    #[test]
    fn directory_cut_short_keeps_what_was_read() {
        let z = archive(&[("a.txt", b"a"), ("b.exe", b"b")]);
        let mut bad = z.clone();
        // Break the second directory header's signature.
        let second = memmem::rfind(&bad, b"PK\x01\x02").unwrap();
        bad[second] = b'X';
        let l = list(&bad);
        assert_eq!(names(&l), ["a.txt"]);
        assert!(!l.complete);
    }

    #[test]
    fn entry_count_is_bounded() {
        let many: Vec<(String, &[u8])> = (0..MAX_ENTRIES + 5).map(|i| (format!("f{i}.txt"), &b""[..])).collect();
        let files: Vec<(&str, &[u8])> = many.iter().map(|(n, d)| (n.as_str(), *d)).collect();
        let l = list(&archive(&files));
        assert_eq!(l.paths.len(), MAX_ENTRIES);
        assert!(!l.complete);
    }

    #[test]
    fn garbage_is_not_an_error() {
        for b in [&b""[..], b"PK", b"PK\x03\x04", b"PK\x05\x06", b"PK\x01\x02\xff\xff", b"not a zip at all"] {
            let l = list(b);
            assert!(l.paths.is_empty(), "{b:?}: {l:?}");
        }
        // An EOCD that claims 0xffff entries but no zip64 locator.
        let mut b = EOCD_SIG.to_vec();
        b.extend_from_slice(&[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(!list(&b).complete);
    }

    #[test]
    fn zip64_directory_is_followed() {
        let z = archive(&[("big.bin", b"x"), ("small.exe", b"y")]);
        let eocd = memmem::rfind(&z, EOCD_SIG).unwrap();
        let cd_size = le32(&z, eocd + 12).unwrap();
        let cd_offset = le32(&z, eocd + 16).unwrap();
        let mut out = z[..eocd].to_vec();
        let record = out.len() as u64;
        out.extend_from_slice(ZIP64_EOCD_SIG);
        out.extend_from_slice(&44u64.to_le_bytes());
        out.extend_from_slice(&[0; 4 + 8]); // versions, disk numbers
        out.extend_from_slice(&2u64.to_le_bytes());
        out.extend_from_slice(&2u64.to_le_bytes());
        out.extend_from_slice(&cd_size.to_le_bytes());
        out.extend_from_slice(&cd_offset.to_le_bytes());
        out.extend_from_slice(ZIP64_LOCATOR_SIG);
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&record.to_le_bytes());
        out.extend_from_slice(&[1, 0, 0, 0]);
        out.extend_from_slice(EOCD_SIG);
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&[0xff; 4]);
        out.extend_from_slice(&[0xff; 8]);
        out.extend_from_slice(&[0, 0]);
        let l = list(&out);
        assert_eq!(names(&l), ["big.bin", "small.exe"]);
        assert!(l.complete);
    }

    proptest::proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..2048)) {
            let l = list(&bytes);
            proptest::prop_assert!(l.paths.len() <= MAX_ENTRIES);
        }

        #[test]
        fn damaged_archives_never_panic(
            cut in 0usize..400,
            flips in proptest::collection::vec((0usize..400, proptest::num::u8::ANY), 0..6),
        ) {
            let mut z = archive(&[("a/b.exe", b"data"), ("c.txt", b"more data"), ("d.js", b"")]);
            for (at, v) in flips {
                let n = z.len();
                z[at % n] = v;
            }
            z.truncate(cut.min(z.len()));
            let l = list(&z);
            proptest::prop_assert!(l.paths.len() <= MAX_ENTRIES);
        }
    }
}
