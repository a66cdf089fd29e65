//! The control socket: `baton reload | status | stop` talk to a running
//! `baton run` over a Unix stream socket (mode 0600 in a 0700 directory,
//! peers of another uid refused), one JSON request line and one JSON
//! response line per connection. JSON lines keep it scriptable with `socat`.

pub mod client;
pub mod proto;
pub mod server;

use std::path::PathBuf;

/// Where control sockets live by default: `/run/baton` for root,
/// `$XDG_RUNTIME_DIR/baton` otherwise, or a per-user directory under the
/// temporary directory when `XDG_RUNTIME_DIR` is unset.
pub fn default_dir() -> PathBuf {
    let uid = rustix::process::geteuid();
    if uid.is_root() {
        return PathBuf::from("/run/baton");
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("baton"),
        None => std::env::temp_dir().join(format!("baton-{}", uid.as_raw())),
    }
}

/// The default control socket of service `name`.
pub fn default_path(name: &str) -> PathBuf {
    default_dir().join(format!("{name}.sock"))
}

/// Service names become file names: letters, digits, `.`, `_` and `-`.
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid name {name:?}: expected 1 to 64 ASCII letters, digits, '.', '_' or '-', not starting with '.' or '-'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["api", "my-app_2", "a.b"] {
            assert_eq!(validate_name(ok), Ok(()), "{ok}");
        }
        for bad in ["", ".hidden", "a/b", "sp ace", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }
}
