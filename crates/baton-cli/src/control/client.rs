//! `baton reload | status | stop`: one request, one answer.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use crate::cli::ControlArgs;
use crate::error::ControlError;

use super::proto::{Request, Response};

/// Finds the control socket: `--control`, else `--name`'s default path, else
/// the only socket in the default directory.
pub fn locate(target: &ControlArgs) -> Result<PathBuf, ControlError> {
    if let Some(path) = &target.control {
        return Ok(path.clone());
    }
    if let Some(name) = &target.name {
        super::validate_name(name).map_err(ControlError::NoSocket)?;
        return Ok(super::default_path(name));
    }
    let dir = super::default_dir();
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "sock"))
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(ControlError::NoSocket(format!(
            "no baton control socket in {}; is `baton run` running? (or pass --name or --control)",
            dir.display()
        ))),
        _ => Err(ControlError::NoSocket(format!(
            "several services run ({}); pass --name to choose one",
            found
                .iter()
                .filter_map(|p| p.file_stem())
                .map(|s| s.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Sends `request` to the baton at `path` and waits for its answer (for a
/// reload, until the new generation is ready or rolled back).
pub fn call(path: &PathBuf, request: &Request) -> Result<Response, ControlError> {
    let io_err = |source| ControlError::Io {
        path: path.clone(),
        error: source,
    };
    let mut stream = UnixStream::connect(path).map_err(|source| ControlError::NotRunning {
        path: path.clone(),
        error: source,
    })?;
    let mut line = serde_json::to_string(request).map_err(|e| io_err(std::io::Error::other(e)))?;
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io_err)?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .map_err(io_err)?;
    if answer.trim().is_empty() {
        return Err(io_err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "baton closed the connection without answering (is it stopping?)",
        )));
    }
    serde_json::from_str(answer.trim())
        .map_err(|e| io_err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
}
