//! containerd's exec, the path a container without the agent takes: what the suite checks on the
//! fast path (exit codes, stderr, stdin, signals, a terminal, scp and sftp), through the shim.

use std::time::Duration;

use shale_tests::ssh::{run, run_within};
use shale_tests::{OrderOptions, Stack, StackOptions};

async fn ssh(cmd: std::process::Command) -> anyhow::Result<shale_tests::SshOutput> {
    run_within(cmd, Duration::from_secs(60)).await
}

#[tokio::test(flavor = "multi_thread")]
async fn containerd_exec_serves_every_channel_kind_when_the_agent_is_off() -> anyhow::Result<()> {
    let stack = Stack::start_with(StackOptions {
        containerd_exec: true,
        ..StackOptions::default()
    })
    .await?;
    let key = stack.key("erin", "ed25519")?;
    let order = stack.order(&key, OrderOptions::default()).await?;
    let target = stack.target(order.to_string(), &key);

    // Not the agent's child: the shim, outside the container's pid namespace, is the parent.
    let mut cmd = target.ssh();
    cmd.arg("echo out; echo err >&2; echo ppid=$PPID; exit 7");
    let out = ssh(cmd).await?;
    assert_eq!(out.code, Some(7), "{out:?}");
    assert_eq!(
        (out.stdout.as_str(), out.stderr.as_str()),
        ("out\nppid=0\n", "err\n")
    );

    for (line, code) in [("kill -KILL $$", 255), ("kill -TERM $$", 143)] {
        let mut cmd = target.ssh();
        cmd.arg(line);
        let out = ssh(cmd).await?;
        assert_eq!(out.code, Some(code), "{line}: {out:?}");
    }

    let t = target.clone();
    let out = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut cmd = t.ssh();
        cmd.arg("wc -c")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn()?;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(&vec![b'x'; 100_000])?;
        anyhow::Ok(shale_tests::SshOutput::from(child.wait_with_output()?))
    })
    .await??;
    assert_eq!(out.stdout.trim(), "100000", "{out:?}");

    // ssh sends EOF at once (its stdin is empty): a terminal keeps its input open regardless,
    // or the shim would hang the shell up before it gets to `tty`.
    let mut cmd = target.ssh_with(&["-tt"]);
    cmd.arg("sleep 1; stty size; tty");
    let out = ssh(cmd).await?;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("/dev/pts/"), "{out:?}");

    let dir = stack.dir.path().to_path_buf();
    let upload = dir.join("up.txt");
    std::fs::write(&upload, "through the shim\n")?;
    let t = target.clone();
    let up = upload.clone();
    let out = tokio::task::spawn_blocking(move || {
        let mut cmd = t.scp();
        cmd.arg(&up).arg(t.remote("up.txt"));
        run(cmd)
    })
    .await??;
    assert_eq!(out.code, Some(0), "scp: {out:?}");
    let batch = dir.join("sftp.batch");
    let down = dir.join("down.txt");
    std::fs::write(&batch, format!("get up.txt {}\n", down.display()))?;
    let t = target.clone();
    let out = tokio::task::spawn_blocking(move || run(t.sftp(&batch))).await??;
    assert_eq!(out.code, Some(0), "sftp: {out:?}");
    assert_eq!(std::fs::read_to_string(&down)?, "through the shim\n");
    stack.stop().await
}
