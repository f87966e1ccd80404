//! The local admin Unix socket: binding with mode 0660 and group `outrelay-admin`, and deciding
//! from SO_PEERCRED who is a global admin (root and members of the admin group; nobody else).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nix::unistd::{Gid, Group, Uid, User};

/// Binds the admin socket at `path` (replacing a stale socket file), mode 0660, group
/// `group` when that group exists.
///
/// # Errors
/// Bind or chmod failures.
pub fn bind(path: &Path, group: &str) -> std::io::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    if let Ok(Some(g)) = Group::from_name(group)
        && let Err(e) = std::os::unix::fs::chown(path, None, Some(g.gid.as_raw()))
    {
        tracing::warn!(error = %e, group, "could not give the admin socket to its group");
    }
    Ok(listener)
}

/// True for root and for members (primary or supplementary) of `group`.
pub fn is_admin(uid: u32, gid: u32, group: &str) -> bool {
    if uid == 0 {
        return true;
    }
    let Ok(Some(g)) = Group::from_name(group) else {
        return false;
    };
    if g.gid == Gid::from_raw(gid) {
        return true;
    }
    match User::from_uid(Uid::from_raw(uid)) {
        Ok(Some(user)) => user.gid == g.gid || g.mem.contains(&user.name),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_admin_and_strangers_are_not() {
        assert!(is_admin(0, 0, "outrelay-admin"));
        // uid 65534 (nobody) is in no admin group, and a missing group admits nobody.
        assert!(!is_admin(
            65534,
            65534,
            "outrelay-admin-group-that-does-not-exist"
        ));
    }
}
