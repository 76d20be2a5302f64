//! Volume and snapshot names become object keys and file names, so they are validated
//! once, here, before any store sees them: this is what stops `../../etc` from ever
//! reaching a path join.

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} name {name:?}: {reason}")]
pub struct NameError {
    /// "volume" or "snapshot".
    pub kind: &'static str,
    /// The refused name.
    pub name: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Accept `[A-Za-z0-9._+-]{1,200}` not starting with `.` or `-`.
pub fn validate_name(kind: &'static str, name: &str) -> Result<(), NameError> {
    let err = |reason| {
        Err(NameError {
            kind,
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return err("it is empty");
    }
    if name.len() > 200 {
        return err("it is longer than 200 bytes");
    }
    if name.starts_with('.') || name.starts_with('-') {
        return err("it starts with '.' or '-'");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+'))
    {
        return err("only letters, digits, '.', '_', '+' and '-' are allowed");
    }
    Ok(())
}

/// `"vm@mon"`: a snapshot as messages name it. Quoted (Rust string syntax) so that a
/// name holding a newline or another control character keeps the message on one line
/// and cannot pass for other text.
pub fn quote_snapshot(volume: &str, snapshot: &str) -> String {
    format!("{:?}", format!("{volume}@{snapshot}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("volume", "vm-101.disk_0").is_ok());
        for bad in ["", "..", "../x", "a/b", ".hidden", "-x", "a b", "a\0b"] {
            assert!(validate_name("volume", bad).is_err(), "{bad:?}");
        }
    }
}
