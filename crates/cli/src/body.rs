//! Bodies the verbs send and print: read from a file or stdin, and carried
//! in the admin API's JSON as UTF-8 text or base64.

use std::io::Read as _;
use std::path::Path;

use anyhow::{Context as _, bail};
use base64::Engine as _;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use serde_json::Value;

/// A body given inline, in a file, or on stdin (`-`).
pub(crate) fn read_body(
    inline: Option<String>,
    file: Option<&Path>,
    what: &str,
) -> anyhow::Result<Vec<u8>> {
    match (inline, file) {
        (Some(text), _) => Ok(text.into_bytes()),
        (None, Some(file)) => read_file(file),
        (None, None) => {
            bail!("give the {what} as an argument, or with --file PATH (`-` for stdin)")
        }
    }
}

/// The bytes of a file, or of stdin for `-`.
pub(crate) fn read_file(file: &Path) -> anyhow::Result<Vec<u8>> {
    if file.as_os_str() == "-" {
        let mut bytes = Vec::new();
        std::io::stdin()
            .read_to_end(&mut bytes)
            .context("cannot read stdin")?;
        return Ok(bytes);
    }
    std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))
}

/// Puts `bytes` in `out` as `<field>` (UTF-8) or `<field>_base64`.
pub(crate) fn set_body(out: &mut Value, field: &str, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(text) => out[field] = Value::from(text),
        Err(_) => out[format!("{field}_base64")] = Value::from(base64_encode(bytes)),
    }
}

/// The bytes of a message or dead letter: `body`, or `body_base64` decoded.
pub(crate) fn body_bytes(item: &Value) -> anyhow::Result<Vec<u8>> {
    if let Some(body) = item["body"].as_str() {
        return Ok(body.as_bytes().to_vec());
    }
    match item["body_base64"].as_str() {
        Some(encoded) => base64_decode(encoded),
        None => Ok(Vec::new()),
    }
}

/// Standard base64 (RFC 4648 alphabet) as the admin API writes it: padded
/// on encoding; on decoding, padding may be there or not, as the CLI's own
/// decoder always allowed.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Standard base64 with padding.
pub(crate) fn base64_encode(bytes: &[u8]) -> String {
    BASE64.encode(bytes)
}

/// Decodes standard base64; padding is optional and whitespace (a wrapped
/// line) is skipped.
pub(crate) fn base64_decode(text: &str) -> anyhow::Result<Vec<u8>> {
    let compact: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    BASE64
        .decode(compact)
        .context("the admin API sent invalid base64")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for bytes in [
            &b""[..],
            b"f",
            b"fo",
            b"foo",
            b"foob",
            b"fooba",
            b"foobar",
            &[0, 255, 128, 7],
        ] {
            let encoded = base64_encode(bytes);
            assert_eq!(base64_decode(&encoded).unwrap(), bytes, "{encoded}");
        }
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_decode("Zg==").unwrap(), b"f");
        // Padding is optional and line breaks are skipped.
        assert_eq!(base64_decode("Zg").unwrap(), b"f");
        assert_eq!(base64_decode("Zm9v\nYmFy").unwrap(), b"foobar");
        assert!(base64_decode("Z!==").is_err());
    }
}
