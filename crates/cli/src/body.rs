//! Bodies the verbs send and print: read from a file or stdin, and carried
//! in the admin API's JSON as UTF-8 text or base64.

use std::io::Read as _;
use std::path::Path;

use anyhow::{Context as _, bail};
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

pub(crate) const BASE64: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub(crate) fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(BASE64[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard base64 (padding and whitespace ignored).
pub(crate) fn base64_decode(text: &str) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
    {
        let value = BASE64
            .iter()
            .position(|&a| a == c)
            .context("the admin API sent invalid base64")?;
        acc = (acc << 6 | value as u32) & 0xFFFF;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
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
        assert!(base64_decode("Z!==").is_err());
    }
}
