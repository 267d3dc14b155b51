//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): each backend walks its own
//! permutation of the table and claims the next free entry in turn, so every backend owns
//! about M/N entries and removing one moves only the entries it owned.
use weir_common::MAGLEV_M;

fn fnv1a(seed: u64, data: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Builds the lookup table. `backends` are (stable name, backend id); the names decide the
/// permutations, so every node computes the same table for the same endpoints whatever the ids.
pub fn table(backends: &[(String, u32)]) -> Vec<u32> {
    let m = MAGLEV_M as u64;
    let mut sorted: Vec<&(String, u32)> = backends.iter().collect();
    sorted.sort();
    let mut out = vec![0u32; MAGLEV_M];
    if sorted.is_empty() {
        return out;
    }
    let perms: Vec<(u64, u64)> = sorted
        .iter()
        .map(|(name, _)| {
            let offset = fnv1a(0x5bd1_e995, name.as_bytes()) % m;
            let skip = fnv1a(0x27d4_eb2f, name.as_bytes()) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; sorted.len()];
    let mut filled = vec![false; MAGLEV_M];
    let mut n = 0;
    'fill: loop {
        for (i, (offset, skip)) in perms.iter().enumerate() {
            let mut c = (offset + next[i] * skip) % m;
            while filled[c as usize] {
                next[i] += 1;
                c = (offset + next[i] * skip) % m;
            }
            filled[c as usize] = true;
            out[c as usize] = sorted[i].1;
            next[i] += 1;
            n += 1;
            if n == MAGLEV_M {
                break 'fill;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<(String, u32)> {
        (0..n)
            .map(|i| (format!("198.18.1.{i}:8080"), i as u32 + 1))
            .collect()
    }

    #[test]
    fn every_backend_gets_a_fair_share() {
        let t = table(&names(3));
        for id in 1..=3 {
            let share = t.iter().filter(|x| **x == id).count();
            assert!(
                (330..=350).contains(&share),
                "backend {id} owns {share} of {MAGLEV_M}"
            );
        }
    }

    #[test]
    fn removing_one_backend_moves_little_else() {
        let before = table(&names(10));
        let mut fewer = names(10);
        let gone = fewer.remove(4).1;
        let after = table(&fewer);
        let moved = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| **b != gone && b != a)
            .count();
        // Entries of surviving backends that changed owner: Maglev keeps this small.
        assert!(
            moved * 100 / MAGLEV_M < 10,
            "{moved} entries of live backends moved"
        );
        assert!(!after.contains(&gone));
    }

    #[test]
    fn same_endpoints_give_same_table_whatever_the_order() {
        let mut rev = names(5);
        rev.reverse();
        assert_eq!(table(&names(5)), table(&rev));
    }
}
