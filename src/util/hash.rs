//! A stable hash for routing: the same key lands in the same place on every machine and in
//! every version of sluice (unlike `std`'s randomly seeded hasher).

/// 32-bit FNV-1a of `bytes`.
pub fn fnv1a(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h = (h ^ u32::from(*b)).wrapping_mul(0x0100_0193);
    }
    h
}

#[cfg(test)]
mod tests {
    #[test]
    fn matches_the_published_test_vectors() {
        assert_eq!(super::fnv1a(b""), 0x811c_9dc5);
        assert_eq!(super::fnv1a(b"a"), 0xe40c_292c);
        assert_eq!(super::fnv1a(b"foobar"), 0xbf9c_f968);
    }
}
