//! What the object and KV verbs share: keys in buckets, listed page by page.

use anyhow::bail;
use serde_json::{Value, json};

use crate::client::{AdminClient, PAGE, query};

/// Every item of a paged listing (`{"<field>": […], "next": …}`), following
/// `next` until the last page.
pub(crate) fn all_pages(
    client: &AdminClient,
    path: &str,
    field: &str,
    prefix: Option<&str>,
) -> anyhow::Result<Vec<Value>> {
    let mut items = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let url = format!(
            "{path}{}",
            query(&[
                ("prefix", prefix.map(str::to_string)),
                ("after", after.clone()),
                ("limit", Some(PAGE.to_string())),
            ])
        );
        let mut page: Value = client.get_json(&url)?;
        match page[field].take() {
            Value::Array(batch) => items.extend(batch),
            _ => bail!("the admin API answered without a `{field}` list"),
        }
        match page["next"].as_str() {
            Some(next) if !next.is_empty() && after.as_deref() != Some(next) => {
                after = Some(next.to_string());
            }
            _ => return Ok(items),
        }
    }
}

pub(crate) fn print_deleted(json: bool, bucket: &str, key: &str) -> anyhow::Result<()> {
    if json {
        println!("{}", json!({"bucket": bucket, "key": key, "deleted": true}));
    } else {
        println!("deleted {bucket}/{key}");
    }
    Ok(())
}

pub(crate) fn with_prefix(prefix: Option<&str>) -> String {
    prefix.map_or_else(String::new, |p| format!(" with prefix `{p}`"))
}
