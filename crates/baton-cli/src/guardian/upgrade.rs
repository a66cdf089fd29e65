//! `baton upgrade`: replacing baton's image in place, and the check of a
//! candidate binary that comes first.
//!
//! The steps, each of which either goes on or leaves the running baton as
//! it was (nothing is half upgraded):
//!
//! 1. refused outright during a reload or a stop;
//! 2. the candidate runs as a child (`upgrade-check`) with the handover on
//!    its fd 3, and must answer "ok" on its fd 4 and exit 0: a binary that
//!    is not baton, cannot run, or does not read this handover version
//!    fails here;
//! 3. what cannot be handed over is finished first (proxy mode: client
//!    connections drain while new ones wait in the accept queue; if they
//!    do not within the stop timeout, the upgrade is abandoned and the
//!    proxy serves again, nothing cut);
//! 4. the handover is written again (the state may have moved), its
//!    descriptors made inheritable, every signal blocked, and `execve`:
//!    the new image answers the client. If `execve` fails, the flags are
//!    put back and the client is told.

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use std::ffi::OsString;

use tracing::info;

use super::children::{Children, Owner};
use super::handover::{self, Handover};
use crate::control::proto::Response;
use crate::exit::ExitStatus;
use crate::sys;

/// The answer a candidate writes on its fd 4 when it accepts the handover.
pub const ACCEPTED: &str = "baton-upgrade-check ok";

/// An upgrade under way.
#[derive(Debug)]
pub struct Upgrade {
    /// The `baton upgrade` client's connection.
    pub conn: UnixStream,
    /// The candidate binary.
    pub binary: PathBuf,
    /// Only check it.
    pub check_only: bool,
    /// The check's pid, and the read end of its answer pipe.
    pub check: Option<(i32, OwnedFd)>,
    /// Its version, once checked.
    pub version: Option<String>,
    /// When it was asked for.
    pub began: Instant,
    /// The number its check must answer.
    pub nonce: u64,
    /// When its check must have answered (`--check-timeout`).
    pub check_deadline: Instant,
}

/// A number for one upgrade, from the process's random hash seed.
pub fn nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// What the loop does next for an upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing yet.
    Wait,
    /// It is over: the client was answered (refused, checked, abandoned).
    Over,
    /// Finish what cannot be handed over, then call [`Upgrade::quiesced`].
    Quiesce,
    /// Replace the image now.
    Exec,
}

impl Upgrade {
    /// An upgrade to `binary` asked for on `conn` (`check_only`: only its
    /// check), whose check must answer within `check_timeout`.
    pub fn new(
        conn: UnixStream,
        binary: PathBuf,
        check_only: bool,
        check_timeout: Duration,
    ) -> Upgrade {
        let now = Instant::now();
        Upgrade {
            conn,
            binary,
            check_only,
            check: None,
            version: None,
            began: now,
            nonce: nonce(),
            check_deadline: crate::knobs::later(now, check_timeout),
        }
    }

    /// Starts the candidate's check (step 2) with `state` on its fd 3: the
    /// path is resolved and vetted first ([`candidate`]).
    pub fn start_check(
        &mut self,
        state: &Handover,
        children: &mut Children,
        env: &[(OsString, OsString)],
    ) -> Result<(), String> {
        self.start_check_with(state, |binary, args, fds| {
            children.start_helper(Owner::UpgradeCheck, binary, args, env, fds)
        })
    }

    /// [`Upgrade::start_check`] of any handover, the check started by
    /// `spawn` (binary, argument vector, descriptors for fds 3 and 4).
    pub fn start_check_with(
        &mut self,
        state: &impl serde::Serialize,
        spawn: impl FnOnce(&Path, &[OsString], &[BorrowedFd<'_>]) -> std::io::Result<i32>,
    ) -> Result<(), String> {
        self.binary = candidate(&self.binary)?;
        let json = serde_json::to_vec(state).map_err(|e| e.to_string())?;
        let memfd = sys::exec::memfd("baton-handover", &json).map_err(|e| e.to_string())?;
        let (answer, answer_tx) =
            rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(|e| e.to_string())?;
        let args: Vec<OsString> = vec![
            self.binary.clone().into(),
            "upgrade-check".into(),
            "--state-fd".into(),
            "3".into(),
            "--answer-fd".into(),
            "4".into(),
        ];
        let pid = spawn(&self.binary, &args, &[memfd.as_fd(), answer_tx.as_fd()])
            .map_err(|e| format!("{} could not be started: {e}", self.binary.display()))?;
        self.check = Some((pid, answer));
        Ok(())
    }

    /// Step 4: `state` in a memfd named by [`handover::ENV`], `fds` (the
    /// descriptors it names) and the client's connection made inheritable,
    /// and `execve` of the checked binary with `argv`. Returns only if that
    /// failed (the flags put back): why.
    pub fn exec(
        &self,
        state: &impl serde::Serialize,
        fds: Vec<BorrowedFd<'_>>,
        argv: &[OsString],
    ) -> String {
        let attempt = || -> Result<String, String> {
            let json = serde_json::to_vec(state).map_err(|e| e.to_string())?;
            let memfd = sys::exec::memfd("baton-handover", &json).map_err(|e| e.to_string())?;
            let mut keep = fds;
            keep.push(memfd.as_fd());
            keep.push(self.conn.as_fd());
            set_inheritable(&keep, true).map_err(|e| e.to_string())?;
            let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
                .filter(|(k, _)| k != handover::ENV)
                .collect();
            env.push((handover::ENV.into(), memfd.as_raw_fd().to_string().into()));
            info!(
                binary = %self.binary.display(),
                to = self.version.as_deref().unwrap_or("?"),
                "upgrade: handing over"
            );
            let error = sys::exec::exec(&self.binary, argv, &env);
            let _ = set_inheritable(&keep, false);
            Ok(format!(
                "execve of {} failed: {error}",
                self.binary.display()
            ))
        };
        attempt().unwrap_or_else(|why| why)
    }
    /// Its check started (`Ok`), or it was refused (the client is told):
    /// the upgrade under way, if any.
    pub fn begun(mut self, started: Result<(), String>) -> Option<Upgrade> {
        match started {
            Ok(()) => {
                info!(binary = %self.binary.display(), "upgrade: checking the new binary");
                Some(self)
            }
            Err(why) => {
                tracing::warn!(binary = %self.binary.display(), "upgrade refused: {why}");
                self.answer(&Response::Error {
                    message: format!("upgrade refused: {why}; baton goes on unchanged"),
                });
                None
            }
        }
    }

    /// The check process `pid` ended with `status`: refused (over), only
    /// a check (answered, over), or on to the quiescing.
    pub fn checked(&mut self, pid: i32, status: ExitStatus) -> Step {
        let Some((_, answer)) = self.check.take_if(|(p, _)| *p == pid) else {
            return Step::Wait;
        };
        let verdict = read_answer(answer, self.nonce).and_then(|version| {
            if status.success() {
                Ok(version)
            } else {
                Err(format!("its check {status}"))
            }
        });
        match verdict {
            Err(why) => {
                let message = format!(
                    "the new binary {} cannot take over: {why}; baton goes on unchanged",
                    self.binary.display()
                );
                tracing::warn!("upgrade refused: {message}");
                self.answer(&Response::Error { message });
                Step::Over
            }
            Ok(version) if self.check_only => {
                tracing::info!(binary = %self.binary.display(), version = %version, "upgrade check passed");
                self.answer(&Response::UpgradeChecked {
                    binary: self.binary.clone(),
                    version,
                });
                Step::Over
            }
            Ok(version) => {
                self.version = Some(version);
                Step::Quiesce
            }
        }
    }

    /// What had to finish before the exec did (`finished`), or not within
    /// `limit`: then the upgrade is abandoned and the client told.
    pub fn quiesced(&mut self, finished: bool, limit: Duration) -> Step {
        if finished {
            return Step::Exec;
        }
        let message = format!(
            "client connections did not finish within --stop-timeout ({}); upgrade abandoned, \
             nothing cut, baton goes on unchanged",
            humantime::format_duration(limit)
        );
        tracing::warn!("upgrade: {message}");
        self.answer(&Response::Error { message });
        Step::Over
    }

    /// The check process, if the check is under way and overdue at `now`:
    /// the caller kills it; the upgrade is over (the client was told).
    pub fn overdue(&mut self, now: Instant, limit: Duration) -> Option<i32> {
        if now < self.check_deadline {
            return None;
        }
        let (pid, _) = self.check.take()?;
        let message = format!(
            "the new binary {} did not answer its check within {} (--check-timeout); \
             baton goes on unchanged",
            self.binary.display(),
            humantime::format_duration(limit)
        );
        tracing::warn!("upgrade refused: {message}");
        self.answer(&Response::Error { message });
        Some(pid)
    }

    /// baton stops: the check process to kill, if one runs; the client is
    /// told.
    pub fn stopping(&mut self) -> Option<i32> {
        self.answer(&Response::Error {
            message: "baton is stopping: upgrade abandoned".to_owned(),
        });
        self.check.take().map(|(pid, _)| pid)
    }

    /// When the loop must look at it again (its check's deadline).
    pub fn deadline(&self) -> Option<Instant> {
        self.check.as_ref().map(|_| self.check_deadline)
    }

    /// The exec failed (`why`): the client is told.
    pub fn failed(&mut self, why: &str) {
        tracing::warn!("upgrade failed: {why}; baton goes on unchanged");
        self.answer(&Response::Error {
            message: format!("upgrade failed: {why}; baton goes on unchanged"),
        });
    }

    /// Answers the client (its connection is closed with the upgrade).
    pub fn answer(&mut self, response: &Response) {
        let _ = self.conn.set_write_timeout(Some(Duration::from_secs(5)));
        if let Ok(mut line) = serde_json::to_string(response) {
            line.push('\n');
            let _ = self.conn.write_all(line.as_bytes());
        }
    }
}

/// The binary `binary` names, as an absolute path that exists and can be
/// executed.
pub fn candidate(binary: &Path) -> Result<PathBuf, String> {
    let path = if binary.is_absolute() {
        binary.to_owned()
    } else {
        std::env::current_dir()
            .map_err(|e| format!("resolving {}: {e}", binary.display()))?
            .join(binary)
    };
    match rustix::fs::access(&path, rustix::fs::Access::EXEC_OK) {
        Ok(()) if path.is_file() => Ok(path),
        Ok(()) => Err(format!("{} is not a file", path.display())),
        Err(e) => Err(format!(
            "{} cannot be executed: {}",
            path.display(),
            std::io::Error::from(e)
        )),
    }
}

/// Reads a finished check's answer: the candidate's version, or why it is
/// refused. It must repeat `nonce`, read from the handover it was given.
pub fn read_answer(answer: OwnedFd, nonce: u64) -> Result<String, String> {
    use std::io::Read;
    // What the check wrote before it exited is in the pipe; a descendant
    // that kept the write end open must not make the loop wait.
    let _ = crate::sys::exec::set_nonblocking(answer.as_fd());
    let mut bytes = Vec::new();
    let _ = std::fs::File::from(answer)
        .take(4096)
        .read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let line = text.lines().next().unwrap_or_default();
    match line.strip_prefix(ACCEPTED) {
        Some(rest) => {
            let word = |key: &str| {
                rest.split_whitespace()
                    .find_map(|w| w.strip_prefix(key))
                    .map(str::to_owned)
            };
            if word("nonce=") != Some(nonce.to_string()) {
                return Err(
                    "its answer does not carry this upgrade's nonce (it did not read the \
                     handover: is it a baton, of this version or later?)"
                        .to_owned(),
                );
            }
            Ok(word("version=").unwrap_or_else(|| "?".to_owned()))
        }
        None if line.is_empty() => Err("it gave no answer (is it a baton?)".to_owned()),
        None => Err(format!("it refused: {line}")),
    }
}

/// Makes `fds` inheritable across `execve` (or, with `inherit` false,
/// close-on-exec again); returns the first error.
pub fn set_inheritable(fds: &[BorrowedFd<'_>], inherit: bool) -> std::io::Result<()> {
    for fd in fds {
        crate::sys::exec::set_inheritable(fd.as_fd(), inherit)?;
    }
    Ok(())
}

/// `baton upgrade-check`: run by the baton that wants to hand over, in the
/// candidate binary; reads the handover from `state_fd` and says on
/// `answer_fd` whether this binary takes it.
pub fn check(state_fd: i32, answer_fd: i32) -> anyhow::Result<std::process::ExitCode> {
    use anyhow::Context;
    let mut answer =
        std::fs::File::from(crate::sys::exec::take_fd(answer_fd).context("the answer descriptor")?);
    let state = crate::sys::exec::take_fd(state_fd)
        .and_then(crate::sys::exec::read_all)
        .context("the state descriptor")?;
    let verdict = serde_json::from_slice::<super::handover::Any>(&state)
        .map_err(|e| format!("the handover is not readable: {e}"))
        .and_then(|h| {
            // Each service's settings must read in this binary too.
            if let super::handover::Any::Instance(i) = &h {
                for s in &i.services {
                    crate::config_file::parse(&s.file, &s.text)
                        .map_err(|e| format!("service {}: {e}", s.name))?;
                }
            }
            h.check()
        });
    match verdict {
        Ok(nonce) => {
            writeln!(
                answer,
                "{ACCEPTED} version={} nonce={nonce}",
                super::handover::baton_version()
            )?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Err(why) => {
            writeln!(answer, "{why}")?;
            Ok(std::process::ExitCode::from(3))
        }
    }
}

/// The raw descriptor numbers of `fds`.
pub fn raw(fds: &[BorrowedFd<'_>]) -> Vec<i32> {
    fds.iter().map(AsRawFd::as_raw_fd).collect()
}
