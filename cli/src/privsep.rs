//! Privilege separation for `shale gateway`: the SSH process's user, the drop to it, and what
//! its children inherit.
//!
//! In OpenSSH's spirit: the process that parses untrusted SSH runs as an unprivileged user
//! with no capabilities and no way back (`no_new_privs`), after it has read its host key and
//! bound its sockets as root. It cannot read the wallet key: the key never reaches its
//! environment or arguments, and the key's files are root's.

use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};
use nix::unistd::{Gid, Uid, User};

/// Environment variables that carry the provider's wallet key or its way in: only the process
/// that signs (the supervisor, which runs the settler) keeps them.
pub const WALLET_ENV: [&str; 3] = [
    "SHALE_PRIVATE_KEY",
    "SHALE_KEYSTORE",
    "SHALE_KEYSTORE_PASSWORD",
];

/// The SSH process's user, created as a system user (no home, no login shell) when missing.
pub fn ensure_user(name: &str) -> anyhow::Result<User> {
    if let Some(user) = lookup(name)? {
        return Ok(user);
    }
    tracing::warn!(
        user = name,
        "creating the system user of the gateway's SSH process"
    );
    let status = Command::new("useradd")
        .args(["--system", "--no-create-home", "--home-dir", "/nonexistent"])
        .args(["--shell", "/usr/sbin/nologin", "--user-group", name])
        .status()
        .context("running useradd")?;
    if !status.success() {
        bail!("useradd {name} failed ({status}); create the user yourself or set [privsep] user");
    }
    lookup(name)?.with_context(|| format!("user {name} is missing right after useradd"))
}

/// The user `name`, if it exists; root is refused.
pub fn lookup(name: &str) -> anyhow::Result<Option<User>> {
    let user = User::from_name(name).with_context(|| format!("looking up user {name}"))?;
    if let Some(u) = &user {
        if u.uid.is_root() || u.gid == Gid::from_raw(0) {
            bail!("[privsep] user {name} is root or in group root: the SSH process must not be");
        }
    }
    Ok(user)
}

/// Makes `dir` and everything in it the user's (the ledger the SSH process writes), after
/// checking that the user can reach it at all.
pub fn hand_over(dir: &Path, user: &User) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = std::fs::canonicalize(dir)?;
    for ancestor in dir.ancestors().skip(1) {
        let meta = std::fs::metadata(ancestor)?;
        let searchable = meta.mode() & 0o001 != 0
            || (meta.uid() == user.uid.as_raw() && meta.mode() & 0o100 != 0)
            || (meta.gid() == user.gid.as_raw() && meta.mode() & 0o010 != 0);
        if !searchable {
            bail!(
                "the gateway's SSH process runs as {} and cannot reach its state directory {}: \
                 {} is not searchable by it (chmod o+x it, or move state_dir)",
                user.name,
                dir.display(),
                ancestor.display()
            );
        }
    }
    chown_tree(&dir, user)
}

fn chown_tree(path: &Path, user: &User) -> anyhow::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    // Links are not followed: a link in the state directory must not hand over its target.
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    nix::unistd::chown(path, Some(user.uid), Some(user.gid))
        .with_context(|| format!("handing {} to {}", path.display(), user.name))?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), user)?;
        }
    }
    Ok(())
}

/// Becomes `user` for good: no supplementary groups, real, effective and saved ids all the
/// user's, no capabilities, and no way to gain any (`no_new_privs`). Checked afterwards; any
/// doubt is an error, never a process that speaks SSH as root.
pub fn drop_to(user: &User) -> anyhow::Result<()> {
    nix::unistd::setgroups(&[user.gid]).context("dropping supplementary groups")?;
    nix::unistd::setresgid(user.gid, user.gid, user.gid).context("setting the group")?;
    nix::unistd::setresuid(user.uid, user.uid, user.uid).context("setting the user")?;
    nix::sys::prctl::set_no_new_privs().context("setting no_new_privs")?;
    if nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        bail!("the SSH process could become root again after dropping privileges");
    }
    let status = std::fs::read_to_string("/proc/self/status")?;
    for field in ["CapEff:", "CapPrm:", "CapAmb:"] {
        let value = status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .map(str::trim)
            .with_context(|| format!("no {field} in /proc/self/status"))?;
        if u64::from_str_radix(value, 16).ok() != Some(0) {
            bail!("the SSH process kept capabilities after dropping privileges ({field} {value})");
        }
    }
    Ok(())
}

/// The environment a child of the supervisor gets: the supervisor's, without the wallet's.
pub fn child_env() -> Vec<(OsString, OsString)> {
    std::env::vars_os()
        .filter(|(k, _)| !WALLET_ENV.iter().any(|w| k == w))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_never_see_the_wallet_key() {
        // SAFETY: this test only sets variables no other test reads.
        unsafe { std::env::set_var("SHALE_PRIVATE_KEY", "0xsecret") };
        let env = child_env();
        assert!(env.iter().all(|(k, _)| k != "SHALE_PRIVATE_KEY"));
        assert!(env.iter().all(|(_, v)| v != "0xsecret"));
    }

    #[test]
    fn root_is_no_user_for_the_ssh_process() {
        assert!(lookup("root").is_err());
        assert!(lookup("no-such-user-here-x").unwrap().is_none());
    }
}
