//! `ssh ORDER@gateway CMD` with the stock client: output, exit codes, stdin, signals, refusals.

use shale_tests::ssh::run;
use shale_tests::{OrderOptions, Stack, DATASET_TEXT};

#[tokio::test(flavor = "multi_thread")]
async fn exec_runs_in_the_orders_container_with_exit_code_and_separate_stderr() -> anyhow::Result<()>
{
    let stack = Stack::start().await?;
    let key = stack.key("alice", "ed25519")?;
    let order = stack.order(&key, OrderOptions::default()).await?;
    let target = stack.target(order.to_string(), &key);

    let mut cmd = target.ssh();
    cmd.arg("echo out; echo err >&2; cat /data/demo/README; exit 7");
    let out = tokio::task::spawn_blocking(move || run(cmd)).await??;
    assert_eq!(out.code, Some(7), "{out:?}");
    assert_eq!(out.stdout, format!("out\n{DATASET_TEXT}"));
    assert_eq!(out.stderr, "err\n");

    // The dataset is read-only and the work volume is writable and persists across sessions.
    let mut cmd = target.ssh();
    cmd.arg("touch /data/demo/x 2>/dev/null && echo wrote-dataset; echo kept > $HOME/note; pwd");
    let out = tokio::task::spawn_blocking(move || run(cmd)).await??;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(!out.stdout.contains("wrote-dataset"), "{out:?}");
    let mut cmd = target.ssh();
    cmd.arg("cat note");
    let out = tokio::task::spawn_blocking(move || run(cmd)).await??;
    assert_eq!(out.stdout, "kept\n", "{out:?}");

    stack.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn stdin_reaches_the_process_and_eof_ends_it() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let key = stack.key("bob", "ecdsa")?;
    let order = stack.order(&key, OrderOptions::default()).await?;
    let target = stack.target(format!("order-{order}"), &key);
    let out = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut cmd = target.ssh();
        cmd.arg("wc -c; echo done")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn()?;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&vec![b'x'; 300_000])?;
        drop(stdin);
        anyhow::Ok(shale_tests::SshOutput::from(child.wait_with_output()?))
    })
    .await??;
    assert_eq!(
        out.stdout.split_whitespace().collect::<Vec<_>>(),
        ["300000", "done"],
        "{out:?}"
    );
    assert_eq!(out.code, Some(0));
    stack.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_process_killed_by_a_signal_reports_the_signal() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let key = stack.key("carol", "rsa")?;
    let order = stack.order(&key, OrderOptions::default()).await?;
    let target = stack.target(format!("{order:#x}"), &key);
    let mut cmd = target.ssh();
    cmd.arg("kill -KILL $$");
    let out = tokio::task::spawn_blocking(move || run(cmd)).await??;
    // The gateway sends exit-signal, and OpenSSH exits 255 for a command killed by a signal.
    assert_eq!(out.code, Some(255), "{out:?}");

    // containerd reports a process that signalled itself as 128+n, as a shell does; only the
    // gateway's own signals and SIGKILL are known to be signals.
    let mut cmd = target.ssh();
    cmd.arg("kill -TERM $$");
    let out = tokio::task::spawn_blocking(move || run(cmd)).await??;
    assert_eq!(out.code, Some(143), "{out:?}");
    stack.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn every_refusal_says_why_on_the_terminal() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let alice = stack.key("alice", "ed25519")?;
    let mallory = stack.key("mallory", "ed25519")?;
    let accepted = stack.order(&alice, OrderOptions::default()).await?;
    let pending = stack
        .order(
            &alice,
            OrderOptions {
                accept: false,
                ..OrderOptions::default()
            },
        )
        .await?;
    let ended = stack.order(&alice, OrderOptions::default()).await?;
    stack.client.terminate(ended).await?;

    let cases = [
        (
            stack.target("root", &alice),
            "'root' is not an order id".to_string(),
        ),
        (
            stack.target("999", &alice),
            "order 999 does not exist".to_string(),
        ),
        (
            // A person at a terminal is told; a BatchMode script gets the plain "Permission
            // denied" (OpenSSH skips keyboard-interactive, which carries the reason, in batch mode).
            stack.target(accepted.to_string(), &mallory).interactive(),
            format!("this key is not the key of order {accepted}"),
        ),
        (
            stack.target(pending.to_string(), &alice),
            format!("order {pending} is not accepted yet"),
        ),
        (
            stack.target(ended.to_string(), &alice),
            format!("order {ended} has ended"),
        ),
    ];
    for (target, expected) in cases {
        let cmd = if target.batch {
            let mut cmd = target.ssh();
            cmd.arg("true");
            cmd
        } else {
            target.ssh_in_terminal("true")
        };
        let out = tokio::task::spawn_blocking(move || run(cmd)).await??;
        assert_eq!(out.code, Some(255), "{expected}: {out:?}");
        // In a terminal, stderr arrives on the terminal, i.e. on script's stdout.
        let seen = format!("{}{}", out.stderr, out.stdout);
        assert!(
            seen.contains(&expected),
            "expected {expected:?} in {seen:?}"
        );
    }

    // The gateway has just read the order count (for 999); an order placed right after it is
    // above that count until the next read, and its client, logging in at once, is let in.
    let mut cmd = stack.target("998", &alice).ssh();
    cmd.arg("true");
    let out = tokio::task::spawn_blocking(move || run(cmd)).await??;
    assert!(out.stderr.contains("order 998 does not exist"), "{out:?}");
    let placed = stack.order(&alice, OrderOptions::default()).await?;
    let mut cmd = stack.target(placed.to_string(), &alice).ssh();
    cmd.arg("echo in");
    let out = tokio::task::spawn_blocking(move || run(cmd)).await??;
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (Some(0), "in\n"),
        "a login right after the order was placed: {out:?}"
    );
    stack.stop().await
}
