//! An interactive `ssh` session driven through a real pseudo-terminal, as a person would use it:
//! the remote shell sees the terminal's type and size, follows a resize, and Ctrl-C interrupts
//! the foreground command without ending the session.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::pty::{openpty, Winsize};
use shale_tests::{OrderOptions, Stack};

nix::ioctl_write_ptr_bad!(set_window_size, nix::libc::TIOCSWINSZ, Winsize);

fn winsize(rows: u16, cols: u16) -> Winsize {
    Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// Reads from the terminal until `needle` appears (or a generous bound passes, then fails).
fn read_until(master: &mut std::fs::File, seen: &mut String, needle: &str) -> anyhow::Result<()> {
    read_until_for(master, seen, needle, Duration::from_secs(60))
}

fn read_until_for(
    master: &mut std::fs::File,
    seen: &mut String,
    needle: &str,
    wait: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 4096];
    while !seen.contains(needle) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "never saw {needle:?} in {seen:?}"
        );
        // Poll first, so a silent terminal fails the test at the deadline instead of hanging it.
        let mut fds = [nix::poll::PollFd::new(
            master.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        if nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(500u16))? == 0 {
            continue;
        }
        match master.read(&mut buf) {
            Ok(0) => anyhow::bail!("terminal closed before {needle:?}; saw {seen:?}"),
            Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => anyhow::bail!("reading the terminal: {e}; saw {seen:?}"),
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_interactive_shell_follows_the_terminal_and_ctrl_c() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let key = stack.key("dave", "ed25519")?;
    let order = stack.order(&key, OrderOptions::default()).await?;
    let target = stack.target(order.to_string(), &key);

    let pty = openpty(Some(&winsize(30, 100)), None)?;
    let master: OwnedFd = pty.master;
    let slave: OwnedFd = pty.slave;
    let mut cmd = target.ssh();
    cmd.arg("-tt")
        .env("TERM", "xterm-256color")
        .stdin(Stdio::from(slave.try_clone()?))
        .stdout(Stdio::from(slave.try_clone()?))
        .stderr(Stdio::from(slave));
    // The terminal becomes ssh's controlling terminal, so a resize reaches it as SIGWINCH.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            if nix::libc::ioctl(0, nix::libc::TIOCSCTTY as _, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    // Our copies of the terminal's slave side go, so the master sees the hang-up when ssh exits.
    drop(cmd);
    let master_fd = master.as_raw_fd();
    let mut term = std::fs::File::from(master);

    let result = tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
        let mut seen = String::new();
        term.write_all(b"echo T=$TERM; stty size\n")?;
        read_until(&mut term, &mut seen, "T=xterm-256color")?;
        read_until(&mut term, &mut seen, "30 100")?;

        unsafe { set_window_size(master_fd, &winsize(40, 120))? };
        // ssh reads the resize (SIGWINCH) and the keys typed after it in whichever order its loop
        // gets to them, as it does against any sshd: ask again until the new size shows.
        let mut asked = 0;
        while !seen.contains("40 120") {
            anyhow::ensure!(asked < 30, "the resize never arrived: {seen:?}");
            term.write_all(b"stty size\n")?;
            asked += 1;
            let _ = read_until_for(&mut term, &mut seen, "40 120", Duration::from_secs(2));
        }

        term.write_all(b"sleep 600; echo not-$((1+1))-interrupted\n")?;
        std::thread::sleep(Duration::from_millis(500));
        term.write_all(&[0x03])?;
        term.write_all(b"echo after-$((6*7))\n")?;
        read_until(&mut term, &mut seen, "after-42")?;
        anyhow::ensure!(
            !seen.contains("not-2-interrupted"),
            "Ctrl-C did not interrupt: {seen:?}"
        );

        term.write_all(b"exit 3\n")?;
        // Keep the terminal open until ssh is done with it, as a person's terminal would be.
        let _ = read_until(&mut term, &mut seen, "\u{0}never");
        Ok(seen)
    })
    .await?;
    let status = tokio::task::spawn_blocking(move || child.wait()).await??;
    let seen = result?;
    assert_eq!(status.code(), Some(3), "{seen}");
    stack.stop().await
}
