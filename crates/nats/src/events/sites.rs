//! Queues placed at a leaf site (docs/edge-design.md §4): a queue named
//! `<name>@<site>` lives in the event bucket of site `<site>` (its
//! server's JetStream domain, as `mayfly status --fleet` names it), so
//! the nodes at that site send to it and deliver it while their link to
//! the hub is down. Any other node reaches it through the site's domain
//! while the links are up. A queue without `@` lives at the hub, as
//! every queue did before; so do buckets, triggers and inboxes.
//!
//! The placement is in the name rather than in a record to look up: a
//! node cut off from the hub resolves it from what it knows itself (its
//! own site), and whoever sends sees where the message will be stored.
//!
//! A message that fails its last attempt becomes a dead letter in its
//! queue's bucket (one batch, so this works while cut off too). A site
//! bucket's ids start above [`SITE_ID_BASE`], so a function's dead
//! letters at the hub and at this node's site never share an id.

use std::sync::Arc;
use std::time::Duration;

use mayfly_store::{QueueRef, Result, StoreError};

use super::{Bucket, NatsEvents};

/// The ids a site bucket gives start above this (10^15: below 2^53, so
/// they stay exact as JSON numbers in any client); the hub's counter
/// never gets near it.
pub(super) const SITE_ID_BASE: i64 = 1_000_000_000_000_000;

/// How long a node waits for another domain's JetStream to answer
/// before it calls it unreachable, when a call to it failed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Where a queue lives, from one node's point of view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Place {
    /// The fleet's bucket, at the hub.
    Hub,
    /// The bucket of this node's own site.
    Local,
    /// The bucket of another site, reached through its domain.
    Site(String),
}

/// Where named queue `queue` lives, for a node at site `own_site` (`None`
/// at the hub) of a fleet whose hub is JetStream domain `hub_domain`.
pub(super) fn place_of(queue: &str, own_site: Option<&str>, hub_domain: &str) -> Place {
    match queue.rsplit_once('@') {
        None => Place::Hub,
        Some((_, site)) if Some(site) == own_site => Place::Local,
        Some((_, site)) if site == hub_domain => Place::Hub,
        Some((_, site)) => Place::Site(site.to_string()),
    }
}

impl NatsEvents {
    /// The bucket `queue` lives in: a function's inbox at the hub, a named
    /// queue where its name places it.
    pub(super) async fn bucket_of(&self, queue: &QueueRef) -> Result<Arc<Bucket>> {
        let QueueRef::Named(name) = queue else {
            return Ok(self.hub.clone());
        };
        match place_of(name, self.fleet.site(), self.fleet.hub_domain()) {
            Place::Hub => Ok(self.hub.clone()),
            Place::Local => self.local.clone().ok_or_else(|| {
                StoreError::Backend(format!("queue `{name}`: this node has no site bucket").into())
            }),
            Place::Site(site) => {
                let opened = self.site_bucket(&site).await;
                self.explained(queue, &Place::Site(site), opened).await
            }
        }
    }

    /// The buckets this node reads whole: the hub's, and its site's.
    pub(super) fn own_buckets(&self) -> Vec<Arc<Bucket>> {
        let mut buckets = vec![self.hub.clone()];
        buckets.extend(self.local.clone());
        buckets
    }

    /// The bucket whose counter gave dead-letter or message id `id`: the
    /// site's when it is above [`SITE_ID_BASE`] and this node has one.
    pub(super) fn bucket_of_id(&self, id: i64) -> Arc<Bucket> {
        match &self.local {
            Some(local) if id > SITE_ID_BASE => local.clone(),
            _ => self.hub.clone(),
        }
    }

    /// Site `site`'s event bucket, opened through its domain the first
    /// time.
    async fn site_bucket(&self, site: &str) -> Result<Arc<Bucket>> {
        let opened =
            |sites: &std::collections::HashMap<String, Arc<Bucket>>| sites.get(site).cloned();
        if let Some(bucket) = opened(&self.sites.lock().unwrap_or_else(|e| e.into_inner())) {
            return Ok(bucket);
        }
        let js = async_nats::jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(2))
            .domain(site)
            .build(self.fleet.client().clone());
        let kv = js.get_key_value(&self.hub.kv.name).await.map_err(|e| {
            StoreError::Backend(
                format!(
                    "site `{site}` has no event bucket `{}` ({e}): has a Mayfly node started \
                     there?",
                    self.hub.kv.name
                )
                .into(),
            )
        })?;
        let bucket = Arc::new(Bucket {
            client: self.fleet.client().clone(),
            prefix: format!("$KV.{}.", kv.name),
            // `$KV.…` does not cross a leaf link; the domain's API does
            // (docs/edge-design.md §1.2, §4.1).
            write_prefix: format!("$JS.{site}.API.$KV.{}.", kv.name),
            kv,
            place: Place::Site(site.to_string()),
            domain: site.to_string(),
            id_base: SITE_ID_BASE,
        });
        let mut sites = self.sites.lock().unwrap_or_else(|e| e.into_inner());
        Ok(sites.entry(site.to_string()).or_insert(bucket).clone())
    }

    /// `result` of a call on `queue` at `place`; a failure is told as
    /// [`StoreError::Unavailable`] naming the store when that store is in
    /// another domain that does not answer now (its "no responders" reads
    /// as "resource does not exist" otherwise).
    pub(super) async fn explained<T>(
        &self,
        queue: &QueueRef,
        place: &Place,
        result: Result<T>,
    ) -> Result<T> {
        let Err(error) = result else {
            return result;
        };
        let (domain, store) = match (place, self.fleet.site()) {
            (Place::Hub, Some(_)) => (
                self.fleet.hub_domain().to_string(),
                format!("the hub (JetStream domain `{}`)", self.fleet.hub_domain()),
            ),
            (Place::Site(site), _) => (site.clone(), format!("site `{site}`")),
            // This node's own server: nothing between them to explain.
            _ => return Err(error),
        };
        let Err(reason) = self.fleet.probe_domain(&domain, PROBE_TIMEOUT).await else {
            return Err(error);
        };
        let here = match self.fleet.site() {
            Some(site) => format!("site `{site}`"),
            None => "the hub".to_string(),
        };
        let (what, advice) = match (queue, place, self.fleet.site()) {
            (QueueRef::Named(name), Place::Hub, Some(site)) => (
                format!("queue `{name}`"),
                format!(
                    "retry once the link is back; a queue placed at this site (`{}@{site}`) \
                     works while it is cut off",
                    name.split('@').next().unwrap_or(name)
                ),
            ),
            (QueueRef::Named(name), _, _) => (
                format!("queue `{name}`"),
                "check the site's leaf link (`mayfly status --fleet`) and retry once it is back"
                    .to_string(),
            ),
            (QueueRef::Inbox(function), _, _) => (
                format!("function `{function}`'s inbox"),
                "retry once the link is back".to_string(),
            ),
        };
        Err(StoreError::Unavailable(format!(
            "{what} is stored at {store}, which is unreachable from {here} ({reason}): {advice}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_lives_where_its_name_places_it() {
        // At the hub, or in an ordinary fleet: plain names at the hub,
        // placed ones at their site, `@<hub domain>` at the hub.
        assert_eq!(place_of("orders", None, "hub"), Place::Hub);
        assert_eq!(
            place_of("orders@site-a", None, "hub"),
            Place::Site("site-a".into())
        );
        assert_eq!(place_of("orders@hub", None, "hub"), Place::Hub);
        // At site a: its own queues are local, others' through their
        // domain, plain names at the hub.
        let a = Some("site-a");
        assert_eq!(place_of("orders", a, "hub"), Place::Hub);
        assert_eq!(place_of("orders@site-a", a, "hub"), Place::Local);
        assert_eq!(
            place_of("orders@site-b", a, "hub"),
            Place::Site("site-b".into())
        );
        assert_eq!(place_of("orders@central", a, "central"), Place::Hub);
    }
}
