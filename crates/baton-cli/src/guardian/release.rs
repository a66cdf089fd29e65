//! Releases: what a generation runs, recorded at spawn so that an earlier
//! one can be run again after a deploy replaced it (`baton rollback`, a
//! failed bake).
//!
//! A release is the executable itself, held open by an `O_PATH`
//! descriptor (a deploy that renames a new file over the path does not
//! touch the inode baton holds, and the generation is started from that
//! descriptor, so what is held is exactly what ran), a short hash of its
//! contents, the working directory resolved through symlinks (a
//! `current -> releases/v2` switch is captured, and interpreted apps,
//! whose executable is the interpreter, are told apart by it), the
//! argument vector, the environment and the user.
//!
//! baton keeps the releases that served most recently ([`KEEP`]): the
//! current one and the ones before it, a descriptor and a few kilobytes
//! each. A release is run again only if it can be reproduced: its file
//! was not written to since and its working directory is still the same
//! directory. Its size and modification time must be what they were; an
//! edit in place that keeps both (its mtime put back) still changes the
//! inode's ctime, and so does a deploy that renames a new file over the
//! path (the old inode loses a link): when the ctime moves, the kept file
//! is hashed again on a thread of its own ([`Releases::recheck`], from the
//! guardian's once-a-second housekeeping) and a release whose contents
//! differ from when it ran is refused. The checks on the loop cost one
//! `fstat` and one `stat`, so a revert is never slowed down; the content
//! hash, shown in `status`, is computed once per new release on a thread
//! of its own, off the guardian's loop.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::policy::Pick;

/// How many releases that served are kept (the current one included).
pub const KEEP: usize = 3;

/// What identifies a file or directory: device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
}

/// A release's description (serializable; the descriptor is kept apart).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    /// 1, 2, … in order of first use.
    pub id: u64,
    /// The executable's path when it was started.
    pub program: PathBuf,
    /// The executable's file.
    pub file: FileId,
    /// Its size.
    pub size: u64,
    /// Modification time (seconds, nanoseconds).
    pub mtime: (i64, i64),
    /// Status change time (seconds, nanoseconds).
    #[serde(default)]
    pub ctime: (i64, i64),
    /// The first 12 hex digits of the FNV-1a 64 hash of its contents, once
    /// known.
    pub hash: Option<String>,
    /// The working directory, resolved.
    pub cwd: PathBuf,
    /// Its identity.
    pub cwd_file: FileId,
    /// The argument vector.
    pub args: Vec<String>,
    /// How many environment variables it had (their values stay private).
    pub env_vars: usize,
    /// Who it runs as.
    pub user: Option<String>,
    /// It is a `#!` script, which the kernel starts by its path (the
    /// interpreter reopens it): its path must still name the file held.
    #[serde(default)]
    pub script: bool,
}

/// A release: its description and the executable, held.
#[derive(Debug, Clone)]
pub struct Release {
    /// The description.
    pub info: Info,
    /// The executable, opened `O_PATH`.
    pub exe: Arc<OwnedFd>,
    /// The working directory, opened `O_PATH` (the app starts in it with
    /// `fchdir`); `None` if it could not be opened again after an upgrade.
    pub dir: Option<Arc<OwnedFd>>,
    /// The content hash, filled in by a thread of its own.
    hashed: Arc<std::sync::OnceLock<String>>,
    /// The last look again at its contents, once its ctime moved: the
    /// file's (size, mtime, ctime) then, and whether the contents were the
    /// same (`None`: still hashing).
    rechecked: Rechecked,
}

/// The last look again at a release's contents: when, and what was found.
type Rechecked = Arc<std::sync::Mutex<Option<(Stamp, Option<bool>)>>>;

/// A file's size, modification time and status change time.
type Stamp = (u64, (i64, i64), (i64, i64));

fn stamp(st: &rustix::fs::Stat) -> Stamp {
    (
        st.st_size as u64,
        (st.st_mtime, st.st_mtime_nsec as i64),
        (st.st_ctime, st.st_ctime_nsec as i64),
    )
}

impl Release {
    /// A release handed over by a previous image.
    pub fn handed_over(info: Info, exe: OwnedFd) -> Release {
        let hashed = Arc::new(std::sync::OnceLock::new());
        if let Some(h) = &info.hash {
            let _ = hashed.set(h.clone());
        }
        let dir = open_dir(&info.cwd)
            .ok()
            .filter(|(_, id)| *id == info.cwd_file)
            .map(|(fd, _)| Arc::new(fd));
        Release {
            info,
            exe: Arc::new(exe),
            dir,
            hashed,
            rechecked: Arc::default(),
        }
    }

    /// Hashes the file again, on a thread of its own, if its ctime moved
    /// since it ran and since the last look.
    fn recheck(&self) {
        let Ok(st) = rustix::fs::fstat(&*self.exe) else {
            return;
        };
        let now = stamp(&st);
        let i = &self.info;
        if now == (i.size, i.mtime, i.ctime) {
            return;
        }
        let Some(ran) = self.hashed.get().cloned() else {
            return;
        };
        {
            let Ok(mut last) = self.rechecked.lock() else {
                return;
            };
            if last.as_ref().is_some_and(|(at, _)| *at == now) {
                return;
            }
            *last = Some((now, None));
        }
        let (Ok(exe), slot) = (self.exe.try_clone(), Arc::clone(&self.rechecked)) else {
            return;
        };
        let _ = std::thread::Builder::new()
            .name("baton-hash".into())
            .spawn(move || {
                let _ = crate::sys::exec::block_signals();
                let same = hash(&exe).ok().map(|h| h == ran);
                if let Ok(mut last) = slot.lock()
                    && last.as_ref().is_some_and(|(at, _)| *at == now)
                {
                    *last = Some((now, same));
                }
            });
    }

    /// Its description, with the hash if known by now.
    pub fn describe(&self) -> Info {
        let mut info = self.info.clone();
        if info.hash.is_none() {
            info.hash = self.hashed.get().cloned();
        }
        info
    }
}

/// The releases baton keeps.
#[derive(Debug, Default)]
pub struct Releases {
    /// Releases that served, oldest first; the last is the current one.
    served: VecDeque<Release>,
    /// Releases of generations that have not served yet.
    pending: Vec<Release>,
    /// The last release reverted during its bake (shown, never run again
    /// unless deployed again).
    reverted: Option<Release>,
    next_id: u64,
}

impl Releases {
    /// The release to start now from `program` in `workdir`: a new one, or
    /// a known one if nothing changed.
    pub fn resolve(
        &mut self,
        program: &Path,
        workdir: &Path,
        args: &[OsString],
        env_vars: usize,
        user: Option<&str>,
    ) -> std::io::Result<Release> {
        let in_dir = |e: std::io::Error| {
            std::io::Error::new(
                e.kind(),
                format!("the working directory {}: {e}", workdir.display()),
            )
        };
        // The release is the directory `workdir` names now (a `current`
        // symlink resolved), held open; a relative command is the one in
        // that very directory.
        let cwd = std::fs::canonicalize(workdir).map_err(in_dir)?;
        let (dir, cwd_file) = open_dir(&cwd).map_err(in_dir)?;
        let relative = args
            .first()
            .map(Path::new)
            .filter(|a| a.is_relative() && a.components().count() > 1);
        let program = match relative {
            Some(command) => std::fs::canonicalize(cwd.join(command))?,
            None => std::fs::canonicalize(program)?,
        };
        let program = program.as_path();
        let exe = rustix::fs::open(
            program,
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(std::io::Error::from)?;
        let st = rustix::fs::fstat(&exe)?;
        let file = FileId {
            dev: st.st_dev,
            ino: st.st_ino,
        };
        let (size, mtime, ctime) = stamp(&st);
        let args: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let same = |r: &&Release| {
            r.info.file == file
                && r.info.size == size
                && r.info.mtime == mtime
                && r.info.cwd == cwd
                && r.info.cwd_file == cwd_file
                && r.info.args == args
                && r.info.user.as_deref() == user
        };
        if let Some(known) = self.served.iter().chain(self.pending.iter()).find(same) {
            return Ok(known.clone());
        }
        // One generation starts at a time: a release still pending belongs
        // to one that failed.
        self.pending.clear();
        self.next_id += 1;
        let hashed = Arc::new(std::sync::OnceLock::new());
        if let Ok(copy) = exe.try_clone() {
            let slot = Arc::clone(&hashed);
            // Reading a large executable takes a while: not on the loop.
            let _ = std::thread::Builder::new()
                .name("baton-hash".into())
                .spawn(move || {
                    // Signals go to the guardian's thread alone.
                    let _ = crate::sys::exec::block_signals();
                    if let Ok(h) = hash(&copy) {
                        let _ = slot.set(h);
                    }
                });
        }
        let release = Release {
            info: Info {
                id: self.next_id,
                program: program.to_owned(),
                file,
                size,
                mtime,
                ctime,
                hash: None,
                cwd,
                cwd_file,
                args,
                env_vars,
                user: user.map(str::to_owned),
                script: is_script(&exe),
            },
            exe: Arc::new(exe),
            dir: Some(Arc::new(dir)),
            hashed,
            rechecked: Arc::default(),
        };
        self.pending.push(release.clone());
        Ok(release)
    }

    /// `release` now serves: it becomes the current one, and the oldest
    /// beyond [`KEEP`] are let go.
    pub fn served(&mut self, id: u64) {
        let release = match self.pending.iter().position(|r| r.info.id == id) {
            Some(i) => self.pending.swap_remove(i),
            None => match self.served.iter().position(|r| r.info.id == id) {
                Some(i) => match self.served.remove(i) {
                    Some(r) => r,
                    None => return,
                },
                None => return,
            },
        };
        self.served.push_back(release);
        while self.served.len() > KEEP {
            self.served.pop_front();
        }
    }

    /// The release on probation failed its bake and was reverted (one
    /// generation starts or bakes at a time: it is the one pending).
    pub fn reverted(&mut self) {
        if let Some(r) = self.pending.pop() {
            self.reverted = Some(r);
        }
    }

    /// The kept release a new generation runs (`None`: the command as it
    /// is now). The one that last served is run only if it can be run as
    /// it ran; the previous one (a rollback) must be kept.
    pub fn kept(&self, pick: Pick) -> std::io::Result<Option<Release>> {
        match pick {
            Pick::Command => Ok(None),
            Pick::Previous => {
                let r = self.previous().ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no previous release is kept")
                })?;
                tracing::info!(
                    release = r.info.id,
                    program = %r.info.program.display(),
                    hash = %r.describe().hash.unwrap_or_default(),
                    cwd = %r.info.cwd.display(),
                    "starting the previous release"
                );
                Ok(Some(r.clone()))
            }
            Pick::Current => Ok(self.current().and_then(|r| match check(r) {
                Ok(()) => Some(r.clone()),
                Err(why) => {
                    tracing::warn!(
                        "the release that last served cannot be run as it ran ({why}); starting the command as it is now"
                    );
                    None
                }
            })),
        }
    }

    /// The release that served before the current one.
    pub fn previous(&self) -> Option<&Release> {
        self.served.iter().rev().nth(1)
    }

    /// The release serving now.
    pub fn current(&self) -> Option<&Release> {
        self.served.back()
    }

    /// The release with this id, if kept.
    pub fn get(&self, id: u64) -> Option<&Release> {
        self.served
            .iter()
            .chain(self.pending.iter())
            .find(|r| r.info.id == id)
    }

    /// The kept releases as `status` shows them.
    pub fn describe(&self) -> Vec<crate::control::proto::ReleaseInfo> {
        let served = self.served.len();
        let role = |i: usize| match served - i {
            1 => "current",
            2 => "previous",
            _ => "older",
        };
        self.served
            .iter()
            .enumerate()
            .map(|(i, r)| (role(i), r))
            .chain(self.pending.iter().map(|r| ("pending", r)))
            .chain(self.reverted.iter().map(|r| ("reverted", r)))
            .map(|(role, r)| crate::control::proto::ReleaseInfo {
                id: r.info.id,
                role: role.to_owned(),
                program: r.info.program.clone(),
                hash: r.describe().hash,
                cwd: r.info.cwd.clone(),
            })
            .collect()
    }

    /// Every kept release (served, oldest first; then pending), for a
    /// handover.
    pub fn all(&self) -> impl Iterator<Item = &Release> {
        self.served.iter().chain(self.pending.iter())
    }

    /// How many releases served.
    pub fn served_count(&self) -> usize {
        self.served.len()
    }

    /// Releases handed over by a previous image: `all` as [`Releases::all`]
    /// listed them, of which the first `served` served.
    pub fn restore(mut all: Vec<Release>, served: usize, next_id: u64) -> Releases {
        let pending = all.split_off(served.min(all.len()));
        Releases {
            served: all.into(),
            pending,
            reverted: None,
            next_id,
        }
    }

    /// The next id to give.
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    /// Looks again at every kept release whose file's ctime moved (see the
    /// module's header); off the loop.
    pub fn recheck(&self) {
        self.all().for_each(Release::recheck);
    }
}

/// Whether `release` can still be run as it ran: its file's contents and
/// its working directory are what they were.
pub fn check(release: &Release) -> Result<(), String> {
    let i = &release.info;
    let st = rustix::fs::fstat(&*release.exe)
        .map_err(|e| format!("looking at {}: {e}", i.program.display()))?;
    let now = stamp(&st);
    let differs = release
        .rechecked
        .lock()
        .ok()
        .and_then(|last| last.as_ref().filter(|(at, _)| *at == now).and_then(|l| l.1))
        == Some(false);
    if (now.0, now.1) != (i.size, i.mtime) || differs {
        return Err(format!(
            "release {} ({}) was changed in place since it ran",
            i.id,
            i.program.display()
        ));
    }
    if i.script {
        // Started by its path: the path must still name the file held.
        let named = rustix::fs::stat(&i.program)
            .is_ok_and(|now| (now.st_dev, now.st_ino) == (i.file.dev, i.file.ino));
        if !named {
            return Err(format!(
                "release {}'s script {} is another file now (a #! script is started by its path)",
                i.id,
                i.program.display()
            ));
        }
    }
    match std::fs::metadata(&i.cwd) {
        Ok(m) if m.dev() == i.cwd_file.dev && m.ino() == i.cwd_file.ino => Ok(()),
        Ok(_) => Err(format!(
            "release {}'s working directory {} is another directory now",
            i.id,
            i.cwd.display()
        )),
        Err(e) => Err(format!(
            "release {}'s working directory {}: {e}",
            i.id,
            i.cwd.display()
        )),
    }
}

/// Directory `path`, opened `O_PATH`, and its identity.
fn open_dir(path: &Path) -> std::io::Result<(OwnedFd, FileId)> {
    let fd = rustix::fs::open(
        path,
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    let st = rustix::fs::fstat(&fd)?;
    Ok((
        fd,
        FileId {
            dev: st.st_dev,
            ino: st.st_ino,
        },
    ))
}

/// Whether the file held by `exe` starts with `#!`.
fn is_script(exe: &OwnedFd) -> bool {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(exe));
    let mut head = [0u8; 2];
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && head == *b"#!"
}

/// The first 12 hex digits of the FNV-1a 64 hash of the file's contents
/// (stable across builds and versions of baton, unlike std's hasher).
fn hash(exe: &OwnedFd) -> std::io::Result<String> {
    // An O_PATH descriptor cannot be read; reopen it through /proc.
    let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(exe));
    let mut file = std::fs::File::open(path)?;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        for &b in &buf[..n] {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    Ok(format!("{h:016x}")[..12].to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_is_the_published_function() {
        // FNV-1a 64 of "a" is 0xaf63dc4c8601ec8c.
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("a");
        std::fs::write(&p, b"a").expect("write");
        let fd = rustix::fs::open(
            &p,
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .expect("open");
        assert_eq!(hash(&fd).expect("hash"), "af63dc4c8601");
    }

    #[test]
    fn a_replaced_file_is_a_new_release_and_the_old_one_stays_runnable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let exe = dir.path().join("app");
        std::fs::write(&exe, b"v1").expect("write");
        let mut r = Releases::default();
        let v1 = r.resolve(&exe, dir.path(), &[], 0, None).expect("v1");
        r.served(v1.info.id);
        assert_eq!(
            r.resolve(&exe, dir.path(), &[], 0, None)
                .expect("same")
                .info
                .id,
            v1.info.id,
            "nothing changed: the same release"
        );
        // A deploy renames a new file over the path.
        let tmp = dir.path().join("app.new");
        std::fs::write(&tmp, b"v2 longer").expect("write");
        std::fs::rename(&tmp, &exe).expect("rename");
        let v2 = r.resolve(&exe, dir.path(), &[], 0, None).expect("v2");
        assert_ne!(v2.info.id, v1.info.id);
        r.served(v2.info.id);
        let previous = r.previous().expect("a previous release");
        assert_eq!(previous.info.id, v1.info.id);
        assert_eq!(check(previous), Ok(()));
        // Only KEEP releases are kept.
        for n in 3..=6 {
            let tmp = dir.path().join("app.new");
            std::fs::write(&tmp, format!("v{n}")).expect("write");
            std::fs::rename(&tmp, &exe).expect("rename");
            let v = r.resolve(&exe, dir.path(), &[], 0, None).expect("v");
            r.served(v.info.id);
        }
        assert_eq!(r.all().count(), KEEP);
    }

    #[test]
    fn a_release_changed_in_place_or_without_its_directory_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let work = dir.path().join("v1");
        std::fs::create_dir(&work).expect("mkdir");
        let exe = dir.path().join("app");
        std::fs::write(&exe, b"v1").expect("write");
        let mut r = Releases::default();
        let v1 = r.resolve(&exe, &work, &[], 0, None).expect("v1");
        assert_eq!(check(&v1), Ok(()));
        std::fs::remove_dir(&work).expect("rmdir");
        assert!(check(&v1).unwrap_err().contains("working directory"));
        std::fs::write(&exe, b"v1 patched").expect("write in place");
        assert!(check(&v1).unwrap_err().contains("changed in place"));
    }

    /// Waits until the kept file's contents were looked at again.
    fn rechecked(r: &Releases, release: &Release) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            r.recheck();
            let done = release
                .rechecked
                .lock()
                .expect("lock")
                .as_ref()
                .is_some_and(|(_, same)| same.is_some());
            if done {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "never rechecked");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Waits for the hash taken when `release` first ran.
    fn hashed(release: &Release) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while release.hashed.get().is_none() {
            assert!(std::time::Instant::now() < deadline, "never hashed");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn an_edit_in_place_that_puts_the_mtime_back_is_found_by_its_contents() {
        let dir = tempfile::tempdir().expect("tempdir");
        let exe = dir.path().join("app");
        std::fs::write(&exe, b"v1 code").expect("write");
        let mut r = Releases::default();
        let v1 = r.resolve(&exe, dir.path(), &[], 0, None).expect("v1");
        r.served(v1.info.id);
        hashed(&v1);
        // The same size, and the old mtime put back.
        let mtime = std::fs::metadata(&exe)
            .expect("meta")
            .modified()
            .expect("mtime");
        std::fs::write(&exe, b"v1 evil").expect("edit");
        std::fs::File::options()
            .write(true)
            .open(&exe)
            .expect("open")
            .set_modified(mtime)
            .expect("put the mtime back");
        assert_eq!(check(&v1), Ok(()), "size and mtime alone are fooled");
        rechecked(&r, &v1);
        assert!(check(&v1).unwrap_err().contains("changed in place"));
        // A deploy that renames a new file over the path moves the old
        // inode's ctime too, but not its contents: it still rolls back.
        let dir2 = tempfile::tempdir().expect("tempdir");
        let exe2 = dir2.path().join("app");
        std::fs::write(&exe2, b"v1 code").expect("write");
        let mut r2 = Releases::default();
        let old = r2.resolve(&exe2, dir2.path(), &[], 0, None).expect("old");
        r2.served(old.info.id);
        hashed(&old);
        let tmp = dir2.path().join("app.new");
        std::fs::write(&tmp, b"v2 code").expect("write");
        std::fs::rename(&tmp, &exe2).expect("rename over");
        rechecked(&r2, &old);
        assert_eq!(check(&old), Ok(()));
    }
}
