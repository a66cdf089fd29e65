//! The guardian's children: starting them (the fork/exec of `sys::spawn`,
//! with `--user`, the app's descriptor limit and `--log-prefix` pipes),
//! knowing who each pid is, and reaping them. baton is the only one who
//! waits for its children (and, as a subreaper, for their orphans).

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use tracing::debug;

use super::generation::{Process, Slot};
use super::output;
use super::readiness;
use crate::config::RunConfig;
use crate::exit::ExitStatus;
use crate::spec::Signal;
use crate::sys;

/// Who a child pid is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// A worker process of a generation.
    Generation(Slot),
    /// The `--ready exec:` check of a worker process.
    Check(Slot),
    /// A candidate binary checking baton's state before an upgrade.
    UpgradeCheck,
    /// The descriptor keeper (`--orphans keep`).
    Keeper,
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
    name: String,
    output: output::Output,
    ids: Option<sys::spawn::Ids>,
    /// The descriptor limit children get (baton's original one).
    nofile: (u64, u64),
    /// Whether generations die with baton (`--orphans stop`).
    parent_death: bool,
    /// Adopted processes (not our children), watched through pidfds.
    watched: std::collections::HashSet<i32>,
}

impl Children {
    /// For the app `cfg` describes.
    pub fn new(cfg: &RunConfig) -> Children {
        Children {
            pids: HashMap::new(),
            name: cfg.name.clone(),
            output: output::Output {
                prefix: cfg.log_prefix,
                sink: cfg.log_file.as_ref().and_then(|spec| {
                    super::logfile::LogSink::start(spec)
                        .inspect_err(|e| {
                            tracing::warn!(error = %e, "the app's output goes to baton's own stderr")
                        })
                        .ok()
                }),
            },
            ids: cfg.user.as_ref().map(|u| sys::spawn::Ids {
                uid: u.uid,
                gid: u.gid,
                groups: u.groups.clone(),
            }),
            nofile: (cfg.nofile.original_soft, cfg.nofile.hard),
            parent_death: cfg.orphans == crate::spec::Orphans::Stop,
            watched: std::collections::HashSet::new(),
        }
    }

    /// Where the app's output goes.
    pub fn output(&self) -> &output::Output {
        &self.output
    }

    /// Forks and execs the app as generation `generation` with `args`,
    /// `env` and the sockets `fds` (fds 3..), its output through
    /// `--log-prefix` pipes if asked.
    pub fn start(
        &mut self,
        slot: Slot,
        release: &super::release::Release,
        args: &[OsString],
        env: &[(OsString, OsString)],
        fds: &[BorrowedFd<'_>],
        listen_pid: bool,
    ) -> std::io::Result<(Process, Option<(OwnedFd, OwnedFd)>)> {
        let pipes = if self.output.piped() {
            Some(output::pipes(&self.output, &self.name, slot)?)
        } else {
            None
        };
        // `PWD` names the directory it starts in, resolved.
        let mut env: Vec<(OsString, OsString)> =
            env.iter().filter(|(k, _)| k != "PWD").cloned().collect();
        env.push(("PWD".into(), release.info.cwd.clone().into()));
        let pid = sys::spawn::spawn(&sys::spawn::Command {
            program: &release.info.program,
            args,
            env: &env,
            fds,
            listen_pid,
            stdout: pipes.as_ref().map(|p| p.stdout.as_fd()),
            stderr: pipes.as_ref().map(|p| p.stderr.as_fd()),
            user: self.ids.as_ref(),
            nofile: Some(self.nofile),
            parent_death: self.parent_death,
            exe: Some(release.exe.as_fd()),
            cwd: Some(&release.info.cwd),
            cwd_fd: release.dir.as_deref().map(AsFd::as_fd),
            session: false,
        })?;
        // The child has its copies of the write ends; ours must go, or the
        // copying never ends.
        let readers = pipes.map(|p| p.readers);
        self.pids.insert(pid, Owner::Generation(slot));
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
        slot: Slot,
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
            parent_death: true,
            exe: None,
            cwd: None,
            cwd_fd: None,
            session: false,
        })?;
        self.pids.insert(pid, Owner::Check(slot));
        Ok(pid)
    }

    /// Runs a helper of baton's own (not the app: no `--user`, no output
    /// prefix) as `owner`, with `fds` as its fds 3, 4, …; it dies with
    /// baton unless it is the keeper.
    pub fn start_helper(
        &mut self,
        owner: Owner,
        program: &std::path::Path,
        args: &[OsString],
        env: &[(OsString, OsString)],
        fds: &[BorrowedFd<'_>],
    ) -> std::io::Result<i32> {
        let pid = sys::spawn::helper(program, args, env, fds, owner == Owner::Keeper)?;
        self.pids.insert(pid, owner);
        Ok(pid)
    }

    /// Counts `pid` as a child of `owner` (handed over by a previous image
    /// of baton, whose children are ours).
    pub fn adopt(&mut self, pid: i32, owner: Owner) {
        self.pids.insert(pid, owner);
    }

    /// Watches generation `generation`'s process `process`, which is not
    /// our child (adopted from a baton that died): `gone(pid)` is sent when
    /// it exits. Fails if the process is gone already (or its pid is
    /// another process's now).
    pub fn watch(
        &mut self,
        process: Process,
        slot: Slot,
        events: &tokio::sync::mpsc::UnboundedSender<super::event::Event>,
    ) -> std::io::Result<()> {
        let pidfd = sys::fdpass::pidfd(process.pid, process.start_time)?;
        self.watch_pidfd(pidfd, process.pid, slot, events)
    }

    /// Watches process `pid` of worker `slot` through `pidfd`, which
    /// refers to it (see [`Children::watch`]).
    pub fn watch_pidfd(
        &mut self,
        pidfd: OwnedFd,
        pid: i32,
        slot: Slot,
        events: &tokio::sync::mpsc::UnboundedSender<super::event::Event>,
    ) -> std::io::Result<()> {
        let pidfd = sys::fdpass::register_readable(pidfd)?;
        let events = events.clone();
        tokio::spawn(async move {
            // Readable once the process has exited; an error means the
            // same for our purpose (nothing more can be known of it).
            let _ = pidfd.readable().await;
            let _ = events.send(super::event::Event::Gone(pid));
        });
        self.pids.insert(pid, Owner::Generation(slot));
        self.watched.insert(pid);
        Ok(())
    }

    /// A watched process that exited (see [`Children::watch`]).
    pub fn gone(&mut self, pid: i32) -> Option<Exit> {
        self.watched.remove(&pid).then(|| Exit {
            pid,
            owner: self.pids.remove(&pid),
            status: ExitStatus::Unknown,
        })
    }

    /// Reaps every child that has exited. A generation's leftovers are
    /// swept first (SIGKILL to its process group) while its exited leader
    /// is still an unreaped zombie: until then the group id cannot belong to
    /// anyone else (pids are reused quickly).
    pub fn reap(&mut self) -> Vec<Exit> {
        self.sweep();
        sys::reaper::reap()
            .into_iter()
            .map(|(pid, status)| {
                let exit = self.claim(pid, status);
                if exit.owner.is_none() {
                    debug!(pid, status = %status.word(), "reaped an orphan");
                }
                exit
            })
            .collect()
    }

    /// Before reaping: the process group of each generation's process
    /// that has exited, still an unreaped zombie, gets SIGKILL.
    pub fn sweep(&self) {
        for (pid, owner) in &self.pids {
            if matches!(owner, Owner::Generation(_)) && sys::reaper::has_exited(*pid) {
                let _ = sys::signal::send_group(*pid, Signal::KILL);
            }
        }
    }

    /// Whether `pid` is a child of these.
    pub fn owns(&self, pid: i32) -> bool {
        self.pids.contains_key(&pid)
    }

    /// The exit of `pid`, reaped by someone else (a baton running several
    /// services reaps for them all).
    pub fn claim(&mut self, pid: i32, status: ExitStatus) -> Exit {
        Exit {
            pid,
            owner: self.pids.remove(&pid),
            status,
        }
    }

    /// Children start as `ids` from now on (`baton update` changed the
    /// user).
    pub fn set_user(&mut self, ids: Option<sys::spawn::Ids>) {
        self.ids = ids;
    }
}
