//! Where a node sits in the plant's network: a zone path from the top of the plant
//! down (`site-1/area-2/cell-3`, IEC 62443's zones nested as ISA-95's levels), given
//! in `[node] zone` and gossiped on the node's card; and the patterns placement rules
//! name zones by (`placement.zone = "site-1/*"`).
//!
//! A pattern matches a zone when each of its segments equals the zone's segment at
//! the same depth or is `*`, and the zone is at least as deep: `site-1` matches
//! `site-1` and everything inside it, `site-1/*` only what is inside one of its
//! zones, `*/*/cell-3` every site's and area's `cell-3`. A node with no zone matches no
//! pattern.

use std::fmt;

/// Most levels a zone path has (enterprise, site, area, cell, and room to spare).
pub const MAX_ZONE_DEPTH: usize = 8;
/// Longest name of one zone in a path.
pub const MAX_ZONE_SEGMENT: usize = 63;
/// Most zones one gateway joins to its own.
pub const MAX_CONDUITS: usize = 16;

/// Why a zone path or pattern cannot be used, with the limit it broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidZone {
    #[error("{levels} levels, at most {MAX_ZONE_DEPTH}")]
    TooDeep { levels: usize },
    #[error("level {level} is {length} characters; each level's name has 1 to {MAX_ZONE_SEGMENT}")]
    Length { level: usize, length: usize },
    #[error("level {level} holds {found:?}; names take letters, digits, `-` and `_`{}", if *.wildcards { ", or are `*`" } else { "" })]
    Character {
        level: usize,
        found: char,
        wildcards: bool,
    },
}

/// A validated zone pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZonePattern {
    segments: Vec<String>,
}

/// The segments of a zone path, each checked; `*` is taken where `wildcards` is set.
fn segments(value: &str, wildcards: bool) -> Result<Vec<String>, InvalidZone> {
    let parts: Vec<&str> = value.split('/').collect();
    if parts.len() > MAX_ZONE_DEPTH {
        return Err(InvalidZone::TooDeep {
            levels: parts.len(),
        });
    }
    for (depth, part) in parts.iter().enumerate() {
        let level = depth + 1;
        if wildcards && *part == "*" {
            continue;
        }
        if part.is_empty() || part.len() > MAX_ZONE_SEGMENT {
            return Err(InvalidZone::Length {
                level,
                length: part.len(),
            });
        }
        if let Some(found) = part
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(InvalidZone::Character {
                level,
                found,
                wildcards,
            });
        }
    }
    Ok(parts.into_iter().map(String::from).collect())
}

/// Checks a node's zone path (`[node] zone`).
pub fn check_zone(value: &str) -> Result<(), InvalidZone> {
    segments(value, false).map(|_| ())
}

impl ZonePattern {
    pub fn parse(value: &str) -> Result<ZonePattern, InvalidZone> {
        Ok(ZonePattern {
            segments: segments(value, true)?,
        })
    }

    /// How many levels down the pattern reaches: of two patterns that match a zone,
    /// the deeper names the smaller part of the plant.
    pub fn depth(&self) -> usize {
        self.segments.len()
    }

    /// Whether a node in `zone` (a checked path; empty: no zone) is one of this
    /// pattern's.
    pub fn matches(&self, zone: &str) -> bool {
        if zone.is_empty() {
            return false;
        }
        let levels: Vec<&str> = zone.split('/').collect();
        levels.len() >= self.segments.len()
            && self
                .segments
                .iter()
                .zip(&levels)
                .all(|(pattern, level)| pattern == "*" || pattern == level)
    }
}

impl fmt::Display for ZonePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.segments.join("/"))
    }
}

/// Whether two nodes share a zone, counting each node's own and those its conduits
/// reach into; a node with no zone shares none.
pub fn share_a_zone<'a>(
    mut mine: impl Iterator<Item = &'a str>,
    theirs: impl Iterator<Item = &'a str> + Clone,
) -> bool {
    mine.any(|zone| theirs.clone().any(|other| other == zone))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gateway_shares_a_zone_with_both_sides_and_the_sides_none() {
        let cell = ["plant/area/cell"];
        let area = ["plant/area"];
        let gateway = ["plant/area", "plant/area/cell"];
        let cloud = ["cloud"];
        let share = |a: &[&str], b: &[&str]| share_a_zone(a.iter().copied(), b.iter().copied());
        assert!(share(&cell, &cell));
        assert!(
            !share(&cell, &area),
            "an area is another segment than its cells"
        );
        assert!(!share(&cell, &cloud));
        assert!(share(&cell, &gateway) && share(&gateway, &area));
        assert!(
            !share(&[], &cloud) && !share(&[], &[]),
            "no zone, no segment"
        );
    }

    #[test]
    fn a_pattern_matches_its_zone_and_what_lies_inside_it() {
        let site = ZonePattern::parse("site-1").unwrap();
        let inside = ZonePattern::parse("site-1/*").unwrap();
        let cells = ZonePattern::parse("*/*/cell-3").unwrap();
        for (pattern, zone, expected) in [
            (&site, "site-1", true),
            (&site, "site-1/area-2/cell-3", true),
            (&site, "site-10", false),
            (&site, "site-2/area-1", false),
            (&inside, "site-1", false),
            (&inside, "site-1/area-2", true),
            (&inside, "site-1/area-2/cell-3", true),
            (&cells, "site-1/area-2/cell-3", true),
            (&cells, "site-2/area-9/cell-3/rack", true),
            (&cells, "site-1/area-2/cell-4", false),
            (&site, "", false),
        ] {
            assert_eq!(pattern.matches(zone), expected, "{pattern} on {zone:?}");
        }
        assert_eq!(inside.to_string(), "site-1/*");
    }

    #[test]
    fn a_bad_path_is_refused_naming_the_level_and_the_limit() {
        for (value, words) in [
            ("", ["level 1", "1 to 63"]),
            ("site-1//cell", ["level 2", "0 characters"]),
            ("site 1", ["level 1", "' '"]),
            ("a/b/c/d/e/f/g/h/i", ["9 levels", "at most 8"]),
        ] {
            let error = check_zone(value).unwrap_err().to_string();
            for word in words {
                assert!(error.contains(word), "{value:?}: {error} lacks {word}");
            }
        }
        assert!(
            check_zone("site-1/*").is_err(),
            "a node's zone has no wildcard"
        );
        assert!(ZonePattern::parse("site-1/*").is_ok());
        check_zone("plant/site_1/area-2/cell-3").unwrap();
    }
}
