//! The state file: what a baton that dies without stopping leaves for the
//! next `baton run` with the same control socket (`--orphans keep`).
//!
//! It lives next to the control socket (in baton's private runtime
//! directory, 0700) as `<control>.state.json`, mode 0600, and is replaced
//! atomically (written to a temporary file, then renamed) whenever the
//! guardian's state changes, so a reader sees one whole version or the
//! previous one. Processes are named by pid *and* start time, so that a
//! pid reused by another process is never taken for ours.

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

/// A live generation's notification socket address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notify {
    /// The generation.
    pub generation: u64,
    /// The worker, and which start of it.
    #[serde(default)]
    pub worker: u32,
    /// See [`super::generation::Slot`].
    #[serde(default)]
    pub incarnation: u32,
    /// Its pid.
    #[serde(default)]
    pub pid: i32,
    /// How clients reach it.
    #[serde(default)]
    pub route: Option<super::generation::Route>,
    /// The abstract socket's name.
    pub address: String,
}

impl Notify {
    /// Its slot.
    pub fn slot(&self) -> super::generation::Slot {
        super::generation::Slot {
            generation: self.generation,
            worker: self.worker,
            incarnation: self.incarnation,
        }
    }
}

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
    /// The generations' notification sockets.
    pub notify: Vec<Notify>,
}

impl State {
    /// Every process of every generation listed.
    pub fn processes(&self) -> impl Iterator<Item = (u64, Process)> + '_ {
        self.generations
            .iter()
            .flat_map(|g| g.processes.iter().map(move |p| (g.id, *p)))
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
    let json = serde_json::to_vec(state).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("json.tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(&json)?;
    drop(file);
    std::fs::rename(&tmp, path)
}

/// Reads the state file at `path`: `Ok(None)` if there is none.
pub fn read(path: &Path) -> Result<Option<State>, String> {
    use std::io::Read;
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
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
}
