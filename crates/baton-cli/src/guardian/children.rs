//! The guardian's children: starting them (the fork/exec of `sys::spawn`,
//! with `--user`, the app's descriptor limit and `--log-prefix` pipes),
//! knowing who each pid is, and reaping them. baton is the only one who
//! waits for its children (and, as a subreaper, for their orphans).

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;

use tracing::debug;

use super::generation::Process;
use super::output;
use super::readiness;
use crate::config::RunConfig;
use crate::exit::ExitStatus;
use crate::spec::Signal;
use crate::sys;

/// Who a child pid is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// The main process of a generation.
    Generation(u64),
    /// The `--ready exec:` check of a generation.
    Check(u64),
    /// A candidate binary checking baton's state before an upgrade.
    UpgradeCheck,
}

/// A child that exited, and whose it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Its pid.
    pub pid: i32,
    /// Whose it was (`None`: an orphan of the app, reaped as a subreaper).
    pub owner: Option<Owner>,
    /// How it ended.
    pub status: ExitStatus,
}

/// Starting and reaping children.
#[derive(Debug)]
pub struct Children {
    pids: HashMap<i32, Owner>,
    program: PathBuf,
    name: String,
    log_prefix: bool,
    ids: Option<sys::spawn::Ids>,
    /// The descriptor limit children get (baton's original one).
    nofile: (u64, u64),
}

impl Children {
    /// For the app `cfg` describes.
    pub fn new(cfg: &RunConfig) -> Children {
        Children {
            pids: HashMap::new(),
            program: cfg.program.clone(),
            name: cfg.name.clone(),
            log_prefix: cfg.log_prefix,
            ids: cfg.user.as_ref().map(|u| sys::spawn::Ids {
                uid: u.uid,
                gid: u.gid,
                groups: u.groups.clone(),
            }),
            nofile: (cfg.nofile.original_soft, cfg.nofile.hard),
        }
    }

    /// Forks and execs the app as generation `generation` with `args`,
    /// `env` and the sockets `fds` (fds 3..), its output through
    /// `--log-prefix` pipes if asked.
    pub fn start(
        &mut self,
        generation: u64,
        args: &[OsString],
        env: &[(OsString, OsString)],
        fds: &[BorrowedFd<'_>],
        listen_pid: bool,
    ) -> std::io::Result<(Process, Option<(OwnedFd, OwnedFd)>)> {
        let pipes = if self.log_prefix {
            Some(output::pipes(&self.name, generation)?)
        } else {
            None
        };
        let pid = sys::spawn::spawn(&sys::spawn::Command {
            program: &self.program,
            args,
            env,
            fds,
            listen_pid,
            stdout: pipes.as_ref().map(|p| p.stdout.as_fd()),
            stderr: pipes.as_ref().map(|p| p.stderr.as_fd()),
            user: self.ids.as_ref(),
            nofile: Some(self.nofile),
        })?;
        // The child has its copies of the write ends; ours must go, or the
        // copying never ends.
        let readers = pipes.map(|p| p.readers);
        self.pids.insert(pid, Owner::Generation(generation));
        let process = Process {
            pid,
            start_time: sys::inspect::start_time(pid),
        };
        Ok((process, readers))
    }

    /// Runs `--ready exec:` `command` for generation `generation`, as the
    /// app's user.
    pub fn start_check(
        &mut self,
        generation: u64,
        command: &str,
        env: &[(OsString, OsString)],
    ) -> std::io::Result<i32> {
        let args = readiness::shell_args(command);
        let pid = sys::spawn::spawn(&sys::spawn::Command {
            program: readiness::SHELL.as_ref(),
            args: &args,
            env,
            fds: &[],
            listen_pid: false,
            stdout: None,
            stderr: None,
            user: self.ids.as_ref(),
            nofile: Some(self.nofile),
        })?;
        self.pids.insert(pid, Owner::Check(generation));
        Ok(pid)
    }

    /// Runs a helper of baton's own (not the app: no `--user`, no output
    /// prefix) as `owner`, with `fds` as its fds 3, 4, ….
    pub fn start_helper(
        &mut self,
        owner: Owner,
        program: &std::path::Path,
        args: &[OsString],
        env: &[(OsString, OsString)],
        fds: &[BorrowedFd<'_>],
    ) -> std::io::Result<i32> {
        let pid = sys::spawn::spawn(&sys::spawn::Command {
            program,
            args,
            env,
            fds,
            listen_pid: false,
            stdout: None,
            stderr: None,
            user: None,
            nofile: None,
        })?;
        self.pids.insert(pid, owner);
        Ok(pid)
    }

    /// Counts generation `generation`'s process `pid` as a child (handed
    /// over by a previous image of baton, whose children are ours).
    pub fn adopt(&mut self, pid: i32, generation: u64) {
        self.pids.insert(pid, Owner::Generation(generation));
    }

    /// Reaps every child that has exited. A generation's leftovers are
    /// swept first (SIGKILL to its process group) while its exited leader
    /// is still an unreaped zombie: until then the group id cannot belong to
    /// anyone else (pids are reused quickly).
    pub fn reap(&mut self) -> Vec<Exit> {
        for (pid, owner) in &self.pids {
            if matches!(owner, Owner::Generation(_)) && sys::reaper::has_exited(*pid) {
                let _ = sys::signal::send_group(*pid, Signal::KILL);
            }
        }
        sys::reaper::reap()
            .into_iter()
            .map(|(pid, status)| {
                let owner = self.pids.remove(&pid);
                if owner.is_none() {
                    debug!(pid, status = %status.word(), "reaped an orphan");
                }
                Exit { pid, owner, status }
            })
            .collect()
    }
}
