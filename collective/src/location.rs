//! Where a rank runs (zone, rack, node) and the ring order that follows from it.
//!
//! A ring that visits g groups one after the other crosses group boundaries exactly g
//! times, the fewest a cycle through all of them can. Sorting by zone, then rack, then
//! node makes every level contiguous at once, so the slowest boundaries (between zones)
//! are crossed least, then those between racks, then those between nodes.

use std::fmt;

/// Where a rank runs, as far as it knows; `None` is unknown.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Location {
    pub zone: Option<String>,
    pub rack: Option<String>,
    pub node: Option<String>,
}

impl Location {
    /// Sort key: each level by name, unknown after every known name.
    fn key(&self) -> [(bool, &str); 3] {
        [&self.zone, &self.rack, &self.node].map(|v| (v.is_none(), v.as_deref().unwrap_or("")))
    }

    /// `zone|rack|node` for the rendezvous record, empty for unknown.
    pub(crate) fn encode(&self) -> String {
        [&self.zone, &self.rack, &self.node]
            .map(|v| escape(v.as_deref().unwrap_or("")))
            .join("|")
    }

    /// Reads the three fields `encode` wrote.
    pub(crate) fn decode<'a>(mut fields: impl Iterator<Item = &'a str>) -> Option<Location> {
        let mut next = || {
            fields
                .next()
                .map(|f| Some(unescape(f)).filter(|v| !v.is_empty()))
        };
        Some(Location {
            zone: next()?,
            rack: next()?,
            node: next()?,
        })
    }
}

impl fmt::Display for Location {
    /// The known parts, outermost first (`zone-a/rack-1/node-3`), or `unknown`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let known: Vec<&str> = [&self.zone, &self.rack, &self.node]
            .into_iter()
            .filter_map(|v| v.as_deref())
            .collect();
        if known.is_empty() {
            f.write_str("unknown")
        } else {
            f.write_str(&known.join("/"))
        }
    }
}

/// Record fields are separated by `|`; a location comes from the environment and may
/// contain anything.
fn escape(s: &str) -> String {
    s.replace('%', "%25").replace('|', "%7C")
}

/// Inverse of `escape`: every `%` in escaped text starts `%25` or `%7C`, so undoing `%7C`
/// first cannot match across an escaped `%`.
fn unescape(s: &str) -> String {
    s.replace("%7C", "|").replace("%25", "%")
}

/// Ring positions for ranks at `locations` (indexed by rank): grouped by zone, then rack,
/// then node, ties by rank. With no location known this is 0..n.
pub(crate) fn placement_order(locations: &[Location]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..locations.len()).collect();
    // Stable: ranks with equal keys keep rank order.
    order.sort_by_key(|&r| locations[r].key());
    order
}

/// `0,2,1,3 (node-a: 0,2 | node-b: 1,3)`: the order, then each run of ranks at one
/// location, for the log.
pub(crate) fn describe(order: &[usize], locations: &[Location]) -> String {
    let join = |ranks: &[usize]| {
        ranks
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    let runs: Vec<String> = order
        .chunk_by(|&a, &b| locations[a] == locations[b])
        .map(|run| format!("{}: {}", locations[run[0]], join(run)))
        .collect();
    format!("{} ({})", join(order), runs.join(" | "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(zone: Option<&str>, rack: Option<&str>, node: Option<&str>) -> Location {
        Location {
            zone: zone.map(Into::into),
            rack: rack.map(Into::into),
            node: node.map(Into::into),
        }
    }

    fn node(n: &str) -> Location {
        at(None, None, Some(n))
    }

    #[test]
    fn ranks_on_one_node_are_neighbours_ties_by_rank() {
        let locs = [
            node("node-a"),
            node("node-b"),
            node("node-a"),
            node("node-b"),
        ];
        let order = placement_order(&locs);
        assert_eq!(order, [0, 2, 1, 3]);
        assert_eq!(
            describe(&order, &locs),
            "0,2,1,3 (node-a: 0,2 | node-b: 1,3)"
        );
    }

    #[test]
    fn zones_before_racks_before_nodes_unknown_last() {
        let locs = [
            at(Some("zone-b"), Some("rack-1"), Some("x")),
            at(Some("zone-a"), Some("rack-2"), Some("y")),
            at(Some("zone-b"), Some("rack-1"), Some("x")),
            // Same rack name as rank 0 in another zone: the zone decides first.
            at(Some("zone-a"), Some("rack-1"), Some("z")),
            Location::default(),
            at(Some("zone-a"), Some("rack-2"), Some("y")),
            // Known zone, unknown rack: after the known racks of its zone.
            at(Some("zone-a"), None, Some("w")),
            // A node name alone sorts after every known zone.
            node("a"),
        ];
        let order = placement_order(&locs);
        assert_eq!(order, [3, 1, 5, 6, 0, 2, 7, 4]);
        assert_eq!(
            describe(&order, &locs),
            "3,1,5,6,0,2,7,4 (zone-a/rack-1/z: 3 | zone-a/rack-2/y: 1,5 | zone-a/w: 6 \
             | zone-b/rack-1/x: 0,2 | a: 7 | unknown: 4)"
        );
    }

    #[test]
    fn no_known_location_keeps_rank_order() {
        let locs = vec![Location::default(); 5];
        assert_eq!(placement_order(&locs), [0, 1, 2, 3, 4]);
        assert_eq!(placement_order(&[]), Vec::<usize>::new());
        assert_eq!(describe(&[0, 1], &locs[..2]), "0,1 (unknown: 0,1)");
    }

    #[test]
    fn record_fields_survive_separators_and_escapes() {
        for loc in [
            Location::default(),
            at(Some("eu|west"), Some("100%"), Some("%7C")),
            at(None, Some("r"), None),
        ] {
            let encoded = loc.encode();
            assert_eq!(encoded.split('|').count(), 3, "{encoded}");
            assert_eq!(Location::decode(encoded.split('|')), Some(loc));
        }
        assert_eq!(Location::decode("a|b".split('|')), None);
    }
}
