//! Random ids for what must never collide: repository and store system ids, lock
//! sessions, gc epochs, probes, receive sessions, temporary file names. One helper, so
//! that every such id has the same strength (128 bits from the operating system's
//! generator, through `rand`).

/// A random 128-bit id in lower-case hex.
pub fn random_id() -> String {
    rand::random::<[u8; 16]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::random_id;

    #[test]
    fn ids_are_32_hex_digits_and_differ() {
        let a = random_id();
        let b = random_id();
        assert_eq!(a.len(), 32);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(a, b);
    }
}
