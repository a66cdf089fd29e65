//! The state file: what a baton that dies without stopping leaves for the
//! next `baton run` with the same control socket (`--orphans keep`).
//!
//! It lives next to the control socket (in baton's private runtime
//! directory, 0700) as `<control>.state.json`, mode 0600, and is replaced
//! atomically (written to a temporary file of a name no one else uses,
//! created new and never through a symlink, then renamed) whenever the
//! guardian's state changes, so a reader sees one whole version or the
//! previous one. It is read without blocking (a FIFO put there is refused
//! at once, as is anything but a regular file) and never deleted because
//! it could not be read. Processes are named by pid *and* start time, so
//! that a pid reused by another process is never taken for ours.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::generation::{Generation, Process};
use super::handover;

/// The version of the format written here.
pub const VERSION: u32 = 1;

/// The largest state file read (a few kilobytes in practice).
const MAX_BYTES: u64 = 1 << 20;

/// The state file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    /// [`VERSION`].
    pub version: u32,
    /// The baton that wrote it.
    pub baton: Process,
    /// Its version.
    pub baton_version: String,
    /// Its descriptor keeper, if one runs.
    pub keeper: Option<Process>,
    /// The service's name.
    pub name: String,
    /// The listeners, in order: a generation has them as fds 3, 4, ….
    pub listeners: Vec<handover::Listener>,
    /// Whether generations are reached through baton's proxy.
    pub proxied: bool,
    /// The live generations (serving, starting, draining).
    pub generations: Vec<Generation>,
    /// The generation serving.
    pub serving: Option<u64>,
    /// The number the next generation gets.
    pub next_id: u64,
    /// Reloads, restarts and rollbacks so far.
    pub stats: super::policy::Stats,
}

impl State {
    /// Every process of every generation listed.
    pub fn processes(&self) -> impl Iterator<Item = (u64, Process)> + '_ {
        self.generations
            .iter()
            .flat_map(|g| g.processes.iter().map(move |p| (g.id, p.process)))
    }
}

/// Where the state file of the baton with control socket `control` lives.
pub fn path(control: &Path) -> PathBuf {
    sibling(control, "state.json")
}

/// Where that baton's descriptor keeper listens.
pub fn keeper_path(control: &Path) -> PathBuf {
    sibling(control, "keeper.sock")
}

/// `<dir>/<control's name without .sock>.<suffix>`.
fn sibling(control: &Path, suffix: &str) -> PathBuf {
    let name = control
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name.strip_suffix(".sock").unwrap_or(&name);
    control.with_file_name(format!("{stem}.{suffix}"))
}

/// Replaces the file at `path` with `state`, atomically.
pub fn write(path: &Path, state: &State) -> std::io::Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let json = serde_json::to_vec(state).map_err(std::io::Error::other)?;
    // A name of this process's own; created new (`O_EXCL`, which also
    // refuses a symlink put there), so it is never someone else's file.
    let tmp = path.with_extension(format!(
        "json.tmp.{}.{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        file.write_all(&json)?;
        drop(file);
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Reads the state file at `path`: `Ok(None)` if there is none.
pub fn read(path: &Path) -> Result<Option<State>, String> {
    use std::io::Read;
    // Without blocking: a FIFO at the path would hold `open` forever.
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let kind = file
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?
        .file_type();
    if !kind.is_file() {
        return Err(format!(
            "{} is not a regular file (a {}): remove it",
            path.display(),
            describe(kind)
        ));
    }
    let mut bytes = Vec::new();
    file.take(MAX_BYTES)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let state: State =
        serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    if state.version != VERSION {
        return Err(format!(
            "{}: state version {} (from baton {}); this baton reads version {VERSION}",
            path.display(),
            state.version,
            state.baton_version
        ));
    }
    Ok(Some(state))
}

/// What kind of file `kind` is, in words.
fn describe(kind: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_dir() {
        "directory"
    } else if kind.is_fifo() {
        "FIFO"
    } else if kind.is_socket() {
        "socket"
    } else if kind.is_block_device() || kind.is_char_device() {
        "device"
    } else {
        "special file"
    }
}

/// Removes the state file (baton stopped: nothing to adopt).
pub fn remove(path: &Path) {
    let _ = std::fs::remove_file(path);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_sit_next_to_the_control_socket() {
        let control = Path::new("/run/user/1000/baton/web.sock");
        assert_eq!(
            path(control),
            Path::new("/run/user/1000/baton/web.state.json")
        );
        assert_eq!(
            keeper_path(control),
            Path::new("/run/user/1000/baton/web.keeper.sock")
        );
        assert_eq!(
            path(Path::new("/tmp/x/ctl")),
            Path::new("/tmp/x/ctl.state.json")
        );
    }

    #[test]
    fn a_missing_file_is_none_and_garbage_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("s.state.json");
        assert!(matches!(read(&p), Ok(None)));
        std::fs::write(&p, b"{not json").expect("write");
        assert!(read(&p).is_err());
        std::fs::write(&p, vec![b' '; 2 << 20]).expect("write");
        assert!(read(&p).is_err(), "a huge file is cut and refused");
    }

    #[test]
    fn a_fifo_or_a_directory_at_the_path_is_refused_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("f.state.json");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .expect("mkfifo");
        // Would block forever without O_NONBLOCK.
        let err = read(&fifo).unwrap_err();
        assert!(err.contains("not a regular file (a FIFO)"), "{err}");
        let link = dir.path().join("l.state.json");
        std::os::unix::fs::symlink(&fifo, &link).expect("symlink");
        assert!(read(&link).unwrap_err().contains("FIFO"));
        let sub = dir.path().join("d.state.json");
        std::fs::create_dir(&sub).expect("dir");
        assert!(read(&sub).unwrap_err().contains("directory"));
    }

    #[test]
    fn writing_never_follows_a_symlink_and_a_stale_temporary_file_does_not_block() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("w.state.json");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").expect("victim");
        // Symlinks where a temporary file of the old fixed name, or of any
        // name, might be expected: none is written through.
        std::os::unix::fs::symlink(&victim, p.with_extension("json.tmp")).expect("symlink");
        let state = State {
            version: VERSION,
            baton: Process {
                pid: 1,
                start_time: Some(1),
            },
            baton_version: "t".into(),
            keeper: None,
            name: "w".into(),
            listeners: Vec::new(),
            proxied: false,
            generations: Vec::new(),
            serving: None,
            next_id: 1,
            stats: Default::default(),
        };
        write(&p, &state).expect("written");
        write(&p, &state).expect("written again");
        assert_eq!(std::fs::read(&victim).expect("victim"), b"precious");
        assert_eq!(read(&p).expect("read").expect("some").name, "w");
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("dir")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp."))
            .collect();
        assert!(left.is_empty(), "no temporary file left behind: {left:?}");
    }
}
