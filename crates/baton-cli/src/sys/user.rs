//! `--user`: who the app runs as. Names are resolved once, at startup,
//! through the C library (so NSS sources such as LDAP work), into plain ids
//! that the child applies between `fork` and `exec` (see `spawn.rs`), where
//! nothing may allocate.

use std::ffi::{CStr, CString};
use std::path::PathBuf;

use crate::spec::UserSpec;

/// The ids and identity the app runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups (including `gid`).
    pub groups: Vec<u32>,
    /// User name (for `USER`/`LOGNAME`).
    pub name: String,
    /// Home directory (for `HOME`).
    pub home: PathBuf,
}

struct Passwd {
    uid: u32,
    gid: u32,
    name: String,
    home: PathBuf,
}

/// Resolves `spec` into ids, or says what is unknown.
pub fn resolve(spec: &UserSpec) -> Result<Credentials, String> {
    let passwd = match spec.user.parse::<u32>() {
        Ok(uid) => lookup_uid(uid).unwrap_or(Passwd {
            uid,
            gid: uid,
            name: uid.to_string(),
            home: PathBuf::from("/"),
        }),
        Err(_) => lookup_user(&spec.user).ok_or_else(|| {
            format!(
                "unknown user {:?} in --user; check the name (getent passwd {})",
                spec.user, spec.user
            )
        })?,
    };
    let gid = match &spec.group {
        None => passwd.gid,
        Some(group) => match group.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => lookup_group(group).ok_or_else(|| {
                format!("unknown group {group:?} in --user; check the name (getent group {group})")
            })?,
        },
    };
    let mut groups = supplementary_groups(&passwd.name, gid);
    if !groups.contains(&gid) {
        groups.insert(0, gid);
    }
    Ok(Credentials {
        uid: passwd.uid,
        gid,
        groups,
        name: passwd.name,
        home: passwd.home,
    })
}

/// Runs a `get*_r` lookup with a growing buffer.
fn with_buffer<T>(
    mut call: impl FnMut(&mut [libc::c_char]) -> (libc::c_int, Option<T>),
) -> Option<T> {
    let mut size = 1024;
    while size <= 1 << 20 {
        let mut buf = vec![0 as libc::c_char; size];
        match call(&mut buf) {
            (libc::ERANGE, _) => size *= 4,
            (_, found) => return found,
        }
    }
    None
}

fn lookup_user(name: &str) -> Option<Passwd> {
    let cname = CString::new(name).ok()?;
    with_buffer(|buf| {
        // SAFETY: `pwd` and `result` are valid for writes; `buf` is valid for
        // writes of its length, which is passed; `cname` is NUL-terminated.
        // On success `result` points to `pwd`, whose strings live in `buf`.
        unsafe {
            let mut pwd: libc::passwd = std::mem::zeroed();
            let mut result = std::ptr::null_mut();
            let rc = libc::getpwnam_r(
                cname.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            );
            (rc, (rc == 0 && !result.is_null()).then(|| to_passwd(&pwd)))
        }
    })
}

fn lookup_uid(uid: u32) -> Option<Passwd> {
    with_buffer(|buf| {
        // SAFETY: as in `lookup_user`.
        unsafe {
            let mut pwd: libc::passwd = std::mem::zeroed();
            let mut result = std::ptr::null_mut();
            let rc = libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result);
            (rc, (rc == 0 && !result.is_null()).then(|| to_passwd(&pwd)))
        }
    })
}

/// Copies the fields out of a `passwd` filled by `getpw*_r`.
///
/// # Safety
///
/// `pwd` must have been filled by a successful `getpw*_r` whose buffer is
/// still alive.
unsafe fn to_passwd(pwd: &libc::passwd) -> Passwd {
    // SAFETY: the caller guarantees the strings are valid C strings.
    let text = |p: *const libc::c_char| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
    Passwd {
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
        name: text(pwd.pw_name),
        home: PathBuf::from(text(pwd.pw_dir)),
    }
}

fn lookup_group(name: &str) -> Option<u32> {
    let cname = CString::new(name).ok()?;
    with_buffer(|buf| {
        // SAFETY: as in `lookup_user`, for `struct group`.
        unsafe {
            let mut grp: libc::group = std::mem::zeroed();
            let mut result = std::ptr::null_mut();
            let rc = libc::getgrnam_r(
                cname.as_ptr(),
                &mut grp,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            );
            (rc, (rc == 0 && !result.is_null()).then_some(grp.gr_gid))
        }
    })
}

/// The groups `name` belongs to (`getgrouplist`), with `gid` among them.
fn supplementary_groups(name: &str, gid: u32) -> Vec<u32> {
    let Ok(cname) = CString::new(name) else {
        return vec![gid];
    };
    let mut count: libc::c_int = 64;
    loop {
        let mut groups = vec![0 as libc::gid_t; count as usize];
        let mut n = count;
        // SAFETY: `groups` has room for `n` entries, which `getgrouplist`
        // reads and updates; `cname` is NUL-terminated.
        let rc = unsafe { libc::getgrouplist(cname.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
        if rc >= 0 {
            groups.truncate(n.max(0) as usize);
            return groups;
        }
        if n <= count || n > 65_536 {
            return vec![gid];
        }
        count = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_unknown_users() {
        let root = resolve(&"root".parse().unwrap()).expect("root exists");
        assert_eq!((root.uid, root.gid), (0, 0));
        assert!(root.groups.contains(&0));
        let err = resolve(&"no-such-user-baton".parse().unwrap()).unwrap_err();
        assert!(err.contains("unknown user \"no-such-user-baton\""), "{err}");
        let err = resolve(&"root:no-such-group-baton".parse().unwrap()).unwrap_err();
        assert!(
            err.contains("unknown group \"no-such-group-baton\""),
            "{err}"
        );
        let numeric = resolve(&"4242:4343".parse().unwrap()).expect("numeric ids need no entry");
        assert_eq!((numeric.uid, numeric.gid), (4242, 4343));
    }
}
