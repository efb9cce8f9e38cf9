//! File type sniffing from an attachment's first bytes ("magic numbers"), and the canonical names of
//! MIME types, for the `attachment_type` condition.
//!
//! A sender chooses the declared `Content-Type` freely, so `attachment_type` also matches the type the
//! content itself shows. Pure functions, no allocation; `docs/rules.md` lists the names returned here.

/// The Windows PE header must start within this many bytes of an `MZ` file. Real linkers put it within
/// the first few hundred bytes; the cap keeps a hostile offset from meaning anything.
const MAX_PE_OFFSET: usize = 64 * 1024;

/// Where ISO 9660 puts its volume descriptor signature `CD001` (sector 16, after the type byte).
const ISO9660_MAGIC_AT: usize = 0x8001;

/// The type shown by `bytes` (an attachment's decoded content, or its beginning), if it is one we know.
pub fn sniff(bytes: &[u8]) -> Option<&'static str> {
    let starts = |magic: &[u8]| bytes.starts_with(magic);
    Some(if is_pe(bytes) {
        "application/x-msdownload"
    } else if starts(b"\x7fELF") {
        "application/x-executable"
    } else if starts(b"PK\x03\x04") || starts(b"PK\x05\x06") {
        "application/zip"
    } else if starts(b"%PDF-") {
        "application/pdf"
    } else if starts(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1") {
        "application/x-ole-storage"
    } else if starts(b"Rar!\x1a\x07\x00") || starts(b"Rar!\x1a\x07\x01\x00") {
        "application/vnd.rar"
    } else if starts(b"7z\xbc\xaf\x27\x1c") {
        "application/x-7z-compressed"
    } else if starts(b"\x1f\x8b") {
        "application/gzip"
    } else if starts(b"MSCF\0\0\0\0") {
        "application/vnd.ms-cab-compressed"
    } else if starts(b"\x4c\0\0\0\x01\x14\x02\0") {
        "application/x-ms-shortcut"
    } else if bytes.get(ISO9660_MAGIC_AT..ISO9660_MAGIC_AT + 5) == Some(b"CD001") {
        "application/x-iso9660-image"
    } else if starts(b"#!") {
        "text/x-shellscript"
    } else {
        return None;
    })
}

/// `MZ`, and the PE signature where the DOS header's `e_lfanew` (offset 0x3C) points. A bare `MZ` (a
/// DOS program, or text that happens to start with those letters) is not reported: modern Windows does
/// not run DOS programs, and a false "executable" would refuse innocent mail.
fn is_pe(bytes: &[u8]) -> bool {
    if !bytes.starts_with(b"MZ") {
        return false;
    }
    let Some(&[a, b, c, d]) = bytes.get(0x3c..0x40) else { return false };
    let at = u32::from_le_bytes([a, b, c, d]) as usize;
    at < MAX_PE_OFFSET && bytes.get(at..at.saturating_add(4)) == Some(b"PE\0\0")
}

/// The type of a zip archive refined by the paths it lists: Office Open XML documents (macro-enabled
/// when they carry a `vbaProject.bin`) and Java archives are zip files, but a rule about zip archives
/// should not hit every `.docx`, and a `.docm` renamed `.docx` should still show its macros.
pub fn refine_zip<'a>(paths: impl IntoIterator<Item = &'a str> + Clone) -> &'static str {
    let has = |name: &str| paths.clone().into_iter().any(|p| p.eq_ignore_ascii_case(name));
    let under = |dir: &str| {
        paths
            .clone()
            .into_iter()
            .any(|p| p.len() > dir.len() && p.get(..dir.len()).is_some_and(|h| h.eq_ignore_ascii_case(dir)))
    };
    if has("[Content_Types].xml") {
        let macros = paths.clone().into_iter().any(|p| p.to_ascii_lowercase().ends_with("vbaproject.bin"));
        let kinds = [
            (
                "word/",
                "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
                "application/vnd.ms-word.document.macroenabled.12",
            ),
            (
                "xl/",
                "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
                "application/vnd.ms-excel.sheet.macroenabled.12",
            ),
            (
                "ppt/",
                "application/vnd.openxmlformats-officedocument.presentationml.presentation",
                "application/vnd.ms-powerpoint.presentation.macroenabled.12",
            ),
        ];
        for (dir, plain, macro_enabled) in kinds {
            if under(dir) {
                return if macros { macro_enabled } else { plain };
            }
        }
    }
    if has("META-INF/MANIFEST.MF") {
        return "application/java-archive";
    }
    "application/zip"
}

/// Well-known aliases and the canonical name each stands for, so that a rule and a declared type that
/// spell the same type differently still match (Outlook declares zip files `application/x-zip-compressed`).
const ALIASES: &[(&str, &str)] = &[
    ("application/x-zip-compressed", "application/zip"),
    ("application/x-zip", "application/zip"),
    ("application/x-msdos-program", "application/x-msdownload"),
    ("application/x-dosexec", "application/x-msdownload"),
    ("application/vnd.microsoft.portable-executable", "application/x-msdownload"),
    ("application/x-ms-dos-executable", "application/x-msdownload"),
    ("application/x-rar-compressed", "application/vnd.rar"),
    ("application/x-rar", "application/vnd.rar"),
    ("application/x-gzip", "application/gzip"),
    ("application/x-elf", "application/x-executable"),
    ("application/x-sh", "text/x-shellscript"),
    ("application/x-shellscript", "text/x-shellscript"),
    ("text/x-sh", "text/x-shellscript"),
    ("application/x-cab-compressed", "application/vnd.ms-cab-compressed"),
    ("application/x-iso9660", "application/x-iso9660-image"),
];

/// The lower-case canonical name of a MIME type (`type/subtype`, parameters already removed).
pub fn canonical(mime: &str) -> String {
    let lower = mime.trim().to_ascii_lowercase();
    match ALIASES.iter().find(|(alias, _)| *alias == lower) {
        Some((_, name)) => (*name).to_string(),
        None => lower,
    }
}

/// Whether `mime` is a zip archive by name (declared types go through [`canonical`] first).
pub fn is_zip(mime: &str) -> bool {
    mime == "application/zip"
}

/// The `attachment_type` patterns of one leaf: exact types and `type/*` families, canonical.
#[derive(Debug, Default)]
pub struct TypePatterns {
    exact: std::collections::HashSet<String>,
    /// `type/` prefixes of the `type/*` patterns.
    families: Vec<String>,
}

impl TypePatterns {
    /// Parses `["application/zip", "image/*"]`; an entry that is not `type/subtype` or `type/*` (RFC 2045
    /// token characters) is an error naming it.
    pub fn parse(list: &[String]) -> Result<TypePatterns, String> {
        if list.is_empty() {
            return Err("attachment_type needs at least one type".into());
        }
        let mut p = TypePatterns::default();
        for entry in list {
            let name = canonical(entry);
            let (ty, sub) = name.split_once('/').ok_or_else(|| bad_type(entry))?;
            if !is_token(ty) || (sub != "*" && !is_token(sub)) {
                return Err(bad_type(entry));
            }
            if sub == "*" {
                p.families.push(format!("{ty}/"));
            } else {
                p.exact.insert(name);
            }
        }
        Ok(p)
    }

    /// Whether a canonical type matches one of the patterns.
    pub fn matches(&self, mime: &str) -> bool {
        self.exact.contains(mime) || self.families.iter().any(|f| mime.starts_with(f.as_str()))
    }
}

fn bad_type(entry: &str) -> String {
    format!("attachment_type {entry:?}: expected \"type/subtype\" or \"type/*\"")
}

/// RFC 2045 §5.1 token characters (no `*`, which only a whole subtype may be).
fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal PE file: `MZ`, `e_lfanew` = 0x40, `PE\0\0` there.
    fn pe() -> Vec<u8> {
        let mut b = vec![0u8; 0x48];
        b[..2].copy_from_slice(b"MZ");
        b[0x3c] = 0x40;
        b[0x40..0x44].copy_from_slice(b"PE\0\0");
        b
    }

    #[test]
    fn magics_map_to_their_names() {
        let mut iso = vec![0u8; 0x8010];
        iso[0x8001..0x8006].copy_from_slice(b"CD001");
        let cases: &[(&[u8], &str)] = &[
            (&pe(), "application/x-msdownload"),
            (b"\x7fELF\x02\x01\x01", "application/x-executable"),
            (b"PK\x03\x04\x14\0", "application/zip"),
            (b"PK\x05\x06\0\0", "application/zip"),
            (b"%PDF-1.7\n", "application/pdf"),
            (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1\0\0", "application/x-ole-storage"),
            (b"Rar!\x1a\x07\x00\xcf", "application/vnd.rar"),
            (b"Rar!\x1a\x07\x01\x00\x33", "application/vnd.rar"),
            (b"7z\xbc\xaf\x27\x1c\0\x04", "application/x-7z-compressed"),
            (b"\x1f\x8b\x08\0", "application/gzip"),
            (b"MSCF\0\0\0\0\x10", "application/vnd.ms-cab-compressed"),
            (b"\x4c\0\0\0\x01\x14\x02\0\0", "application/x-ms-shortcut"),
            (&iso, "application/x-iso9660-image"),
            (b"#!/bin/sh\necho hi\n", "text/x-shellscript"),
        ];
        for (bytes, name) in cases {
            assert_eq!(sniff(bytes), Some(*name), "{:?}", &bytes[..bytes.len().min(8)]);
        }
    }

    #[test]
    fn unknown_or_short_input_is_none() {
        for b in [&b""[..], b"M", b"MZ", b"MZ text that starts like a DOS header", b"P", b"PK", b"Hello", b"\x7fEL"] {
            assert_eq!(sniff(b), None, "{b:?}");
        }
        // e_lfanew pointing past the end, or far away, is not a PE file.
        let mut b = pe();
        b[0x3c] = 0xff;
        assert_eq!(sniff(&b), None);
        let mut b = pe();
        b[0x3c..0x40].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(sniff(&b), None);
    }

    #[test]
    fn aliases_are_canonical() {
        assert_eq!(canonical(" Application/X-Zip-Compressed "), "application/zip");
        assert_eq!(canonical("application/x-dosexec"), "application/x-msdownload");
        assert_eq!(canonical("image/PNG"), "image/png");
        assert!(is_zip(&canonical("application/x-zip-compressed")));
        assert!(!is_zip(&canonical("application/gzip")));
    }

    #[test]
    fn zip_family_is_refined_by_its_paths() {
        let docx = ["[Content_Types].xml", "_rels/.rels", "word/document.xml"];
        assert_eq!(refine_zip(docx), "application/vnd.openxmlformats-officedocument.wordprocessingml.document");
        let xlsm = ["[Content_Types].xml", "xl/workbook.xml", "xl/vbaProject.bin"];
        assert_eq!(refine_zip(xlsm), "application/vnd.ms-excel.sheet.macroenabled.12");
        let pptx = ["[Content_Types].xml", "ppt/presentation.xml"];
        assert_eq!(refine_zip(pptx), "application/vnd.openxmlformats-officedocument.presentationml.presentation");
        assert_eq!(refine_zip(["META-INF/MANIFEST.MF", "a/B.class"]), "application/java-archive");
        assert_eq!(refine_zip(["invoice.exe"]), "application/zip");
        // A content-types file alone, or a word/ directory alone, is just a zip.
        assert_eq!(refine_zip(["[Content_Types].xml"]), "application/zip");
        assert_eq!(refine_zip(["word/document.xml"]), "application/zip");
        assert_eq!(refine_zip([]), "application/zip");
    }

    #[test]
    fn type_patterns_match_exact_and_families() {
        let list = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let p = TypePatterns::parse(&list(&["Application/X-Zip-Compressed", "image/*"])).unwrap();
        assert!(p.matches("application/zip"));
        assert!(p.matches("image/png"));
        assert!(!p.matches("application/pdf"));
        assert!(!p.matches("imagex/png"));
        for bad in ["zip", "*/*", "application/", "/zip", "text/pl ain", "a/b/c"] {
            assert!(TypePatterns::parse(&list(&[bad])).is_err(), "{bad}");
        }
        assert!(TypePatterns::parse(&[]).is_err());
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = sniff(&bytes);
        }
    }
}
