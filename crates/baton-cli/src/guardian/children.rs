//! The guardian's children: starting them (the fork/exec of `sys::spawn`,
//! with `--user`, the app's descriptor limit and `--log-prefix` pipes),
//! knowing who each pid is, and reaping them. baton is the only one who
//! waits for its children (and, as a subreaper, for their orphans).

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::{AsFd, BorrowedFd};
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
    ) -> std::io::Result<Process> {
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
        // The child has its copies; ours must go, or the copying never ends.
        drop(pipes);
        self.pids.insert(pid, Owner::Generation(generation));
        Ok(Process {
            pid,
            start_time: sys::inspect::start_time(pid),
        })
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
                    debug!(pid, status = status.word(), "reaped an orphan");
                }
                Exit { pid, owner, status }
            })
            .collect()
    }
}
