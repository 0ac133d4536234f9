//! Partition shapes for the nemesis: pure functions from a shape, the node set and a
//! random source to a set of directed cuts.
//!
//! A *cut* `(from, to)` means "packets from `from` do not reach `to`"; the proxy
//! ([`super::proxy::Net::block_all`]) enforces exactly that. A partition is a set of
//! cuts, returned sorted and without duplicates so that a seeded run is reproducible.
//!
//! | shape                    | who can talk to whom                                        |
//! |--------------------------|-------------------------------------------------------------|
//! | [`Shape::Halves`]        | minority (⌊n/2⌋) and majority (⌈n/2⌉), no traffic between  |
//! | [`Shape::OneWay`]        | a random group A cannot send to the rest; the rest can send to A |
//! | [`Shape::IsolateNode`]   | one given node (e.g. the leader) alone, both directions     |
//! | [`Shape::RandomIsolate`] | one random node alone                                       |
//! | [`Shape::Bridge`]        | two halves that cannot see each other plus a bridge node that sees both |
//! | [`Shape::MajoritiesRing`]| every node hears a majority, no two nodes the same majority |
//!
//! Nodes are `usize` indices; the `nodes` slices are expected to hold distinct values.

use rand::seq::SliceRandom;
use rand::Rng;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// A directed cut: `(from, to)` means packets from `from` do not reach `to`.
pub type Cut = (usize, usize);

/// The shape of a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shape {
    /// A random split into a minority of ⌊n/2⌋ nodes and a majority of ⌈n/2⌉ nodes,
    /// cut in both directions.
    Halves,
    /// A random non-empty proper subset A: traffic from A to the others is cut, traffic
    /// from the others to A flows.
    OneWay,
    /// This node is cut from every other node, both directions.
    IsolateNode(usize),
    /// A random node is cut from every other node, both directions.
    RandomIsolate,
    /// Two halves of the other n−1 nodes that cannot see each other, bridged by one
    /// random node that sees both (Jepsen's "bridge"). Needs n ≥ 3, else no cuts.
    Bridge,
    /// Jepsen's "majorities ring": nodes on a random ring, each node hears only the
    /// majority-sized window of the ring it sits in the middle of, so every node hears a
    /// majority but no two nodes hear the same one. Cuts are one-way when the majority is
    /// even-sized.
    MajoritiesRing,
}

impl Shape {
    /// The shapes that take no argument, for a nemesis that picks one at random.
    pub const RANDOM: [Shape; 5] = [
        Shape::Halves,
        Shape::OneWay,
        Shape::RandomIsolate,
        Shape::Bridge,
        Shape::MajoritiesRing,
    ];
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Shape::Halves => f.write_str("halves"),
            Shape::OneWay => f.write_str("one-way"),
            Shape::IsolateNode(x) => write!(f, "isolate {x}"),
            Shape::RandomIsolate => f.write_str("isolate random"),
            Shape::Bridge => f.write_str("bridge"),
            Shape::MajoritiesRing => f.write_str("majorities ring"),
        }
    }
}

/// The cuts of `shape` over `nodes`, drawing randomness from `rng`; sorted, no
/// duplicates. Too few nodes for a shape give no cuts.
pub fn cuts<R: Rng + ?Sized>(shape: &Shape, nodes: &[usize], rng: &mut R) -> Vec<Cut> {
    let n = nodes.len();
    let mut shuffled = nodes.to_vec();
    shuffled.shuffle(rng);
    let mut out = BTreeSet::new();
    match shape {
        Shape::Halves => {
            let (minority, majority) = shuffled.split_at(n / 2);
            cut_between(&mut out, minority, majority, true);
        }
        Shape::OneWay => {
            if n >= 2 {
                let k = rng.random_range(1..n);
                let (a, rest) = shuffled.split_at(k);
                cut_between(&mut out, a, rest, false);
            }
        }
        Shape::IsolateNode(x) => isolate(&mut out, *x, nodes),
        Shape::RandomIsolate => {
            if let Some(&x) = shuffled.first() {
                isolate(&mut out, x, nodes);
            }
        }
        Shape::Bridge => {
            if n >= 3 {
                let rest = &shuffled[1..];
                let (a, b) = rest.split_at(rest.len() / 2);
                cut_between(&mut out, a, b, true);
            }
        }
        Shape::MajoritiesRing => {
            let m = n / 2 + 1;
            for i in 0..n {
                let window: Vec<usize> = (0..m).map(|k| shuffled[(i + k) % n]).collect();
                let hearer = window[m / 2];
                for &y in &shuffled {
                    if !window.contains(&y) {
                        out.insert((y, hearer));
                    }
                }
            }
        }
    }
    out.into_iter().collect()
}

fn cut_between(out: &mut BTreeSet<Cut>, a: &[usize], b: &[usize], both: bool) {
    for &x in a {
        for &y in b {
            out.insert((x, y));
            if both {
                out.insert((y, x));
            }
        }
    }
}

fn isolate(out: &mut BTreeSet<Cut>, x: usize, nodes: &[usize]) {
    for &y in nodes.iter().filter(|&&y| y != x) {
        out.insert((x, y));
        out.insert((y, x));
    }
}

/// Whether packets from `from` reach `to` directly under `cuts` (a node always reaches
/// itself).
pub fn can_reach(from: usize, to: usize, cuts: &[Cut]) -> bool {
    from == to || !cuts.contains(&(from, to))
}

/// The groups of `nodes` connected through links that are open in both directions
/// (transitively): each group sorted, groups ordered by their smallest node. A bridge
/// partition is one group; halves are two.
pub fn components(nodes: &[usize], cuts: &[Cut]) -> Vec<Vec<usize>> {
    let cut: BTreeSet<Cut> = cuts.iter().copied().collect();
    let mut unseen: BTreeSet<usize> = nodes.iter().copied().collect();
    let mut groups = Vec::new();
    while let Some(start) = unseen.pop_first() {
        let mut group = vec![start];
        let mut stack = vec![start];
        while let Some(x) = stack.pop() {
            let next: Vec<usize> = unseen
                .iter()
                .copied()
                .filter(|&y| !cut.contains(&(x, y)) && !cut.contains(&(y, x)))
                .collect();
            for y in next {
                unseen.remove(&y);
                group.push(y);
                stack.push(y);
            }
        }
        group.sort_unstable();
        groups.push(group);
    }
    groups
}

/// When `cuts` is exactly "every node of A cut from every node of B, both directions"
/// (A and B non-empty, together the nodes named in `cuts`), returns `(A, B)` with the
/// smaller side first (on a tie, the side holding the smallest node).
pub fn as_split(cuts: &[Cut]) -> Option<(Vec<usize>, Vec<usize>)> {
    let set: BTreeSet<Cut> = cuts.iter().copied().collect();
    let &(first, _) = set.first()?;
    let named: BTreeSet<usize> = set.iter().flat_map(|&(a, b)| [a, b]).collect();
    let b: Vec<usize> = named
        .iter()
        .copied()
        .filter(|&y| set.contains(&(first, y)))
        .collect();
    let a: Vec<usize> = named.iter().copied().filter(|y| !b.contains(y)).collect();
    let mut expected = BTreeSet::new();
    cut_between(&mut expected, &a, &b, true);
    if a.is_empty() || b.is_empty() || expected != set {
        return None;
    }
    let a_first = a.len() < b.len() || (a.len() == b.len() && a[0] < b[0]);
    Some(if a_first { (a, b) } else { (b, a) })
}

/// A short human form of `cuts` for the nemesis log: `"{1,2} x {3,4,5}"` for a
/// symmetric split, otherwise the links, `"1↔2"` when cut both ways and `"1→2"` when
/// one way; `"none"` when empty.
pub fn describe(cuts: &[Cut]) -> String {
    if cuts.is_empty() {
        return "none".into();
    }
    if let Some((a, b)) = as_split(cuts) {
        return format!("{} x {}", set_str(&a), set_str(&b));
    }
    let set: BTreeSet<Cut> = cuts.iter().copied().collect();
    // Key: the unordered pair; value: (low→high cut, high→low cut).
    let mut pairs: BTreeMap<(usize, usize), (bool, bool)> = BTreeMap::new();
    for &(a, b) in &set {
        let e = pairs.entry((a.min(b), a.max(b))).or_default();
        if a <= b {
            e.0 = true;
        } else {
            e.1 = true;
        }
    }
    let parts: Vec<String> = pairs
        .into_iter()
        .map(|((lo, hi), dirs)| match dirs {
            (true, true) => format!("{lo}↔{hi}"),
            (true, false) => format!("{lo}→{hi}"),
            _ => format!("{hi}→{lo}"),
        })
        .collect();
    parts.join(" ")
}

fn set_str(xs: &[usize]) -> String {
    let inner: Vec<String> = xs.iter().map(usize::to_string).collect();
    format!("{{{}}}", inner.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    const SIZES: [usize; 3] = [3, 5, 7];
    const SEEDS: u64 = 200;

    fn for_all(shape: Shape, check: impl Fn(&[usize], &[Cut])) {
        for n in SIZES {
            // Non-contiguous ids, to catch index/id mix-ups.
            let nodes: Vec<usize> = (0..n).map(|i| 10 + 3 * i).collect();
            for seed in 0..SEEDS {
                let mut rng = SmallRng::seed_from_u64(seed);
                let c = cuts(&shape, &nodes, &mut rng);
                let mut sorted = c.clone();
                sorted.sort_unstable();
                sorted.dedup();
                assert_eq!(sorted, c, "sorted and deduplicated");
                assert!(c.iter().all(|(a, b)| a != b && nodes.contains(a)));
                check(&nodes, &c);
            }
        }
    }

    fn symmetric(c: &[Cut]) -> bool {
        c.iter().all(|&(a, b)| c.contains(&(b, a)))
    }

    #[test]
    fn halves_split_minority_from_majority() {
        for_all(Shape::Halves, |nodes, c| {
            let n = nodes.len();
            assert!(symmetric(c));
            let groups = components(nodes, c);
            assert_eq!(groups.len(), 2, "{c:?}");
            let mut sizes: Vec<usize> = groups.iter().map(Vec::len).collect();
            sizes.sort_unstable();
            assert_eq!(sizes, vec![n / 2, n.div_ceil(2)]);
            // No link inside a group is cut; every link across is.
            for g in &groups {
                for &x in g {
                    for &y in nodes {
                        assert_eq!(can_reach(x, y, c), g.contains(&y), "{x}->{y} {c:?}");
                    }
                }
            }
            assert_eq!(c.len(), 2 * (n / 2) * n.div_ceil(2));
            let (a, b) = as_split(c).expect("a symmetric split");
            assert_eq!((a.len(), b.len()), (n / 2, n.div_ceil(2)));
        });
    }

    #[test]
    fn one_way_cuts_one_direction_only() {
        for_all(Shape::OneWay, |nodes, c| {
            assert!(!c.is_empty());
            assert!(c.iter().all(|&(a, b)| can_reach(b, a, c)), "{c:?}");
            let a: BTreeSet<usize> = c.iter().map(|&(x, _)| x).collect();
            assert!(!a.is_empty() && a.len() < nodes.len());
            for &x in nodes {
                for &y in nodes {
                    let cut = a.contains(&x) && !a.contains(&y);
                    assert_eq!(!can_reach(x, y, c), cut, "{x}->{y} {c:?}");
                }
            }
        });
    }

    #[test]
    fn isolate_node_cuts_it_from_everyone() {
        for n in SIZES {
            let nodes: Vec<usize> = (0..n).collect();
            let mut rng = SmallRng::seed_from_u64(7);
            let c = cuts(&Shape::IsolateNode(1), &nodes, &mut rng);
            assert_eq!(c.len(), 2 * (n - 1));
            for &y in &nodes {
                for &z in &nodes {
                    let cut = y != z && (y == 1 || z == 1);
                    assert_eq!(!can_reach(y, z, &c), cut);
                }
            }
            assert_eq!(components(&nodes, &c).len(), 2);
            let others: Vec<usize> = nodes.iter().copied().filter(|&y| y != 1).collect();
            assert_eq!(describe(&c), format!("{{1}} x {}", set_str(&others)));
        }
        for_all(Shape::RandomIsolate, |nodes, c| {
            let groups = components(nodes, c);
            assert_eq!(groups.len(), 2);
            assert!(groups.iter().any(|g| g.len() == 1));
            assert_eq!(c.len(), 2 * (nodes.len() - 1));
        });
    }

    #[test]
    fn bridge_sees_both_halves_which_do_not_see_each_other() {
        for_all(Shape::Bridge, |nodes, c| {
            let n = nodes.len();
            assert!(symmetric(c));
            let bridges: Vec<usize> = nodes
                .iter()
                .copied()
                .filter(|&b| {
                    nodes
                        .iter()
                        .all(|&y| can_reach(b, y, c) && can_reach(y, b, c))
                })
                .collect();
            assert_eq!(bridges.len(), 1, "{c:?}");
            let (a, b) = as_split(c).expect("halves split");
            assert_eq!((a.len(), b.len()), ((n - 1) / 2, (n - 1).div_ceil(2)));
            assert!(!a.contains(&bridges[0]) && !b.contains(&bridges[0]));
            for &x in &a {
                for &y in &b {
                    assert!(!can_reach(x, y, c) && !can_reach(y, x, c));
                }
            }
            assert_eq!(
                components(nodes, c).len(),
                1,
                "connected through the bridge"
            );
        });
        let mut rng = SmallRng::seed_from_u64(1);
        assert!(cuts(&Shape::Bridge, &[0, 1], &mut rng).is_empty());
    }

    #[test]
    fn majorities_ring_every_node_hears_a_distinct_majority() {
        for_all(Shape::MajoritiesRing, |nodes, c| {
            let m = nodes.len() / 2 + 1;
            let heard: BTreeSet<Vec<usize>> = nodes
                .iter()
                .map(|&x| {
                    let h: Vec<usize> = nodes
                        .iter()
                        .copied()
                        .filter(|&y| can_reach(y, x, c))
                        .collect();
                    assert_eq!(h.len(), m, "{x} hears {h:?}");
                    h
                })
                .collect();
            assert_eq!(heard.len(), nodes.len(), "distinct majorities: {c:?}");
        });
    }

    #[test]
    fn same_seed_same_cuts() {
        let nodes = [0, 1, 2, 3, 4];
        for shape in Shape::RANDOM {
            let a = cuts(&shape, &nodes, &mut SmallRng::seed_from_u64(42));
            let b = cuts(&shape, &nodes, &mut SmallRng::seed_from_u64(42));
            assert_eq!(a, b, "{shape}");
        }
    }

    #[test]
    fn tiny_clusters_get_no_impossible_cuts() {
        let mut rng = SmallRng::seed_from_u64(3);
        for shape in Shape::RANDOM {
            assert!(cuts(&shape, &[], &mut rng).is_empty(), "{shape}");
            assert!(cuts(&shape, &[4], &mut rng).is_empty(), "{shape}");
        }
    }

    #[test]
    fn describe_forms() {
        assert_eq!(describe(&[]), "none");
        let mut c = Vec::new();
        for (x, y) in [(3, 1), (3, 2), (4, 1), (4, 2), (5, 1), (5, 2)] {
            c.push((x, y));
            c.push((y, x));
        }
        assert_eq!(describe(&c), "{1,2} x {3,4,5}");
        assert_eq!(describe(&[(0, 1), (1, 0)]), "{0} x {1}");
        assert_eq!(describe(&[(2, 1), (1, 3), (3, 1)]), "2→1 1↔3");
        assert_eq!(describe(&[(0, 1)]), "0→1");
        assert_eq!(as_split(&[(0, 1), (1, 0), (0, 2)]), None);
        assert_eq!(components(&[0, 1, 2], &[(0, 1)]), vec![vec![0, 1, 2]]);
        assert_eq!(
            components(&[0, 1, 2], &[(0, 1), (2, 1)]),
            vec![vec![0, 2], vec![1]]
        );
    }
}
