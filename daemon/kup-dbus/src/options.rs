//! Keys of the `options` dictionary (`a{sv}`) of `Manager1.Update`.
//!
//! kupd rejects a key it does not know, or a value of the wrong type, with
//! `org.kup.Error.InvalidArgs`, so a typo never silently changes what an update does.

/// `s`: extra kernel command line arguments appended to the target's command line
/// (after the current one and before `kup.handoff=`), e.g. `"quiet mitigations=auto"`.
pub const APPEND: &str = "append";

/// Every key kupd accepts, with the D-Bus signature of its value.
pub const KNOWN: &[(&str, &str)] = &[(APPEND, "s")];

/// A human list of the known keys, for error messages: `append (s)`.
#[must_use]
pub fn describe_known() -> String {
    KNOWN
        .iter()
        .map(|(key, sig)| format!("{key} ({sig})"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn known_options_are_listed() {
        assert_eq!(super::describe_known(), "append (s)");
    }
}
