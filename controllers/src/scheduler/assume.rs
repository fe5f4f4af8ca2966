//! Bindings this process has made that the watch caches may not show yet (kube-scheduler's
//! "assume cache"). Without it, two guests reconciled back to back would both see the same
//! free capacity and could overfill a node.

use std::collections::HashMap;

use super::Resources;

#[derive(Debug, Default)]
pub(crate) struct AssumeCache {
    /// By guest uid.
    bindings: HashMap<String, Assumed>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Assumed {
    node: String,
    demand: Resources,
}

/// One guest as the watch cache shows it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CachedGuest<'a> {
    pub uid: &'a str,
    pub node: Option<&'a str>,
    pub demand: Resources,
}

impl AssumeCache {
    pub fn contains(&self, uid: &str) -> bool {
        self.bindings.contains_key(uid)
    }

    pub fn assume(&mut self, uid: &str, node: &str, demand: Resources) {
        self.bindings.insert(uid.to_string(), Assumed { node: node.to_string(), demand });
    }

    /// Drops an assumption whose binding was never written.
    pub fn forget(&mut self, uid: &str) {
        self.bindings.remove(uid);
    }

    /// What each node has allocated: every bound guest in the caches, plus the assumed
    /// bindings the caches do not show yet. Assumptions the caches have caught up with (the
    /// guest shows a node) or that no longer matter (the guest is gone) are dropped here.
    pub fn allocations<'a>(
        &mut self,
        guests: impl IntoIterator<Item = CachedGuest<'a>>,
    ) -> HashMap<String, Resources> {
        let mut allocated: HashMap<String, Resources> = HashMap::new();
        let mut pending = HashMap::with_capacity(self.bindings.len());
        for guest in guests {
            match guest.node {
                Some(node) => {
                    *allocated.entry(node.to_string()).or_default() += guest.demand;
                }
                None => {
                    if let Some((uid, assumed)) = self.bindings.remove_entry(guest.uid) {
                        pending.insert(uid, assumed);
                    }
                }
            }
        }
        // Whatever is left in `bindings` is bound in the cache now, or deleted.
        self.bindings = pending;
        for assumed in self.bindings.values() {
            *allocated.entry(assumed.node.clone()).or_default() += assumed.demand;
        }
        allocated
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: Resources = Resources { cpus: 1, memory_mib: 512 };

    fn guest<'a>(uid: &'a str, node: Option<&'a str>) -> CachedGuest<'a> {
        CachedGuest { uid, node, demand: SMALL }
    }

    #[test]
    fn assumed_bindings_count_until_the_cache_shows_them() {
        let mut cache = AssumeCache::default();
        cache.assume("a", "n1", SMALL);
        cache.assume("b", "n1", SMALL);
        // The cache has not seen either binding yet.
        let alloc = cache.allocations([guest("a", None), guest("b", None), guest("c", Some("n2"))]);
        assert_eq!(alloc["n1"], Resources { cpus: 2, memory_mib: 1024 });
        assert_eq!(alloc["n2"], SMALL);
        assert!(cache.contains("a"));
        // "a" shows its binding; "b" was deleted: both assumptions go, nothing is counted twice.
        let alloc = cache.allocations([guest("a", Some("n1")), guest("c", Some("n2"))]);
        assert_eq!(alloc["n1"], SMALL);
        assert!(!cache.contains("a") && !cache.contains("b"));
    }

    #[test]
    fn forget_drops_a_failed_binding() {
        let mut cache = AssumeCache::default();
        cache.assume("a", "n1", SMALL);
        cache.forget("a");
        assert!(cache.allocations([guest("a", None)]).is_empty());
    }
}
