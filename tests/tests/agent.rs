//! The fast path end to end: stock `ssh` into processes the container's agent started, on
//! stdio the broker made. One test in this binary, so the descriptors it counts are its own.

use std::time::{Duration, Instant};

use shale_tests::ssh::run_within;
use shale_tests::{OrderOptions, Stack};

/// Descriptors this process (the gateway, its broker and the stack) holds now.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

async fn ssh(cmd: std::process::Command) -> anyhow::Result<shale_tests::SshOutput> {
    run_within(cmd, Duration::from_secs(60)).await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_runs_every_session_and_leaves_nothing_behind() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let key = stack.key("dora", "ed25519")?;
    let order = stack.order(&key, OrderOptions::default()).await?;
    let target = stack.target(order.to_string(), &key);

    // The session's shell is the agent's child: the fast path is the one taken.
    let mut cmd = target.ssh();
    cmd.arg("tr '\\0' ' ' < /proc/$PPID/cmdline");
    let out = ssh(cmd).await?;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.starts_with("/run/shale/agent "), "{out:?}");
    let baseline = open_fds();

    // Exit codes and signals as containerd's exec reports them (tests/tests/ssh_exec.rs).
    for (line, code) in [
        ("exit 3", 3),
        ("kill -KILL $$", 255),
        ("kill -TERM $$", 143),
    ] {
        let mut cmd = target.ssh();
        cmd.arg(line);
        let out = ssh(cmd).await?;
        assert_eq!(out.code, Some(code), "{line}: {out:?}");
    }

    // A terminal session whose shell leaves a job behind ends with the shell, as with sshd;
    // pipes the job no longer holds end too.
    let mut cmd = target.ssh_with(&["-tt"]);
    cmd.arg("sleep 300 & echo started");
    let out = ssh(cmd).await?;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("started"), "{out:?}");
    let mut cmd = target.ssh();
    cmd.arg("sleep 300 >/dev/null 2>&1 & echo ok");
    let out = ssh(cmd).await?;
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (Some(0), "ok\n"),
        "{out:?}"
    );

    // Every descriptor of those sessions is closed again (the jobs still run).
    let deadline = Instant::now() + Duration::from_secs(20);
    while open_fds() > baseline && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        open_fds() <= baseline,
        "{} descriptors open after the sessions, {baseline} before",
        open_fds()
    );

    // The tenant kills the agent from inside: the session it carried ends with the reason,
    // and the next one gets a new agent.
    let mut cmd = target.ssh();
    cmd.arg("kill -KILL $PPID; sleep 2; echo not-reached-as-a-status");
    let out = ssh(cmd).await?;
    // 255 when the agent had reported the start before the shell killed it; 1 (the start
    // failed) when the kill came first. Either way the reason is the agent's going.
    assert!(matches!(out.code, Some(255) | Some(1)), "{out:?}");
    assert!(
        out.stderr.contains("the container's agent went away"),
        "{out:?}"
    );
    let mut cmd = target.ssh();
    cmd.arg("echo back; tr '\\0' ' ' < /proc/$PPID/cmdline");
    let out = ssh(cmd).await?;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.starts_with("back\n/run/shale/agent "), "{out:?}");

    stack.stop().await
}
