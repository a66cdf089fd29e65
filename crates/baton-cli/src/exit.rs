//! How a process ended, and the shell's exit code for it.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The end of a child process, as `waitpid(2)` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitStatus {
    /// It called `exit` with this code.
    Exited(i32),
    /// It was killed by this signal.
    Signaled(i32),
    /// It is gone, and how is not known: it was adopted from a baton that
    /// died, so it is not this baton's child and its status went to
    /// whoever reaped it.
    Unknown,
}

impl ExitStatus {
    /// The code a shell would report: the exit code, or 128+N for signal N.
    pub fn shell_code(self) -> u8 {
        match self {
            ExitStatus::Exited(code) => (code & 0xff) as u8,
            ExitStatus::Signaled(sig) => (128 + sig).clamp(0, 255) as u8,
            ExitStatus::Unknown => 1,
        }
    }

    /// Whether it exited with code 0.
    pub fn success(self) -> bool {
        self == ExitStatus::Exited(0)
    }
}

impl ExitStatus {
    /// One word for a log field: the exit code (`0`), or the signal's name
    /// (`SIGKILL`).
    pub fn word(self) -> String {
        match self {
            ExitStatus::Exited(code) => code.to_string(),
            ExitStatus::Signaled(sig) => match crate::spec::Signal::from_number(sig) {
                Some(s) => s.to_string(),
                None => format!("signal-{sig}"),
            },
            ExitStatus::Unknown => "unknown".to_owned(),
        }
    }
}

/// How it ended, as the end of a sentence: "exited with code 3", "was
/// killed by signal 9 (SIGKILL)".
impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ExitStatus::Exited(code) => write!(f, "exited with code {code}"),
            ExitStatus::Signaled(sig) => match crate::spec::Signal::from_number(sig) {
                Some(s) => write!(f, "was killed by signal {sig} ({s})"),
                None => write!(f, "was killed by signal {sig}"),
            },
            ExitStatus::Unknown => {
                f.write_str("exited (how is unknown: it was adopted, not started, by this baton)")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_codes() {
        assert_eq!(ExitStatus::Exited(0).shell_code(), 0);
        assert_eq!(ExitStatus::Exited(3).shell_code(), 3);
        assert_eq!(ExitStatus::Signaled(9).shell_code(), 137);
        assert_eq!(ExitStatus::Signaled(15).shell_code(), 143);
        assert_eq!(
            ExitStatus::Signaled(9).to_string(),
            "was killed by signal 9 (SIGKILL)"
        );
        assert_eq!(ExitStatus::Exited(1).to_string(), "exited with code 1");
        assert_eq!(ExitStatus::Signaled(9).word(), "SIGKILL");
        assert_eq!(ExitStatus::Exited(0).word(), "0");
    }
}
