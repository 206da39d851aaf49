//! Processes in an order's container: stdio, exit codes, signals, stdin EOF, PTY, concurrency,
//! TCP into the order's network namespace, and containerd going away mid-exec.

mod common;

use std::time::Duration;

use common::*;
use shale_provisioner::{ExecRequest, ExitStatus, ProvisionError, PtySize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn exec_reports_output_streams_and_exit_codes(path: ExecPath) {
    let Some(h) = Harness::busybox_via(path).await else {
        return;
    };
    h.prov.ensure(&lease(1)).await.expect("ensure");
    let (out, err, st) = sh(&h.prov, 1, "echo out; echo err >&2; exit 3").await;
    assert_eq!(
        (out.as_str(), err.as_str(), st),
        ("out\n", "err\n", ExitStatus::Code(3))
    );
    let (out, _, st) = run(&h.prov, 1, &["id", "-u"]).await;
    assert_eq!((out.trim(), st), ("0", ExitStatus::Code(0)));
    let (out, _, _) = sh(&h.prov, 1, "pwd; echo $HOME; echo $SHALE_ORDER").await;
    assert_eq!(out, "/work\n/work\n1\n");

    let req = ExecRequest {
        argv: argv(&["/bin/sh", "-c", "echo $GREETING; pwd"]),
        env: vec![("GREETING".into(), "hello".into())],
        cwd: Some("/tmp".into()),
        tty: None,
    };
    let p = h.prov.exec(1, req).await.expect("exec");
    // The path asked for is the one taken: the agent's processes are named by it.
    assert_eq!(
        p.handle.exec_id().starts_with("agent-"),
        matches!(path, ExecPath::Agent),
        "{}",
        p.handle.exec_id()
    );
    assert_eq!(read_all(p.stdout).await, "hello\n/tmp\n");
    assert_eq!(p.handle.wait().await.expect("wait"), ExitStatus::Code(0));
    h.prov.release(1).await.expect("release");
}

async fn a_missing_program_is_an_exec_error(path: ExecPath) {
    let Some(h) = Harness::busybox_via(path).await else {
        return;
    };
    h.prov.ensure(&lease(2)).await.expect("ensure");
    let err = h
        .prov
        .exec(2, cmd(&["/no/such/program"]))
        .await
        .err()
        .expect("exec of a missing program fails");
    assert!(
        matches!(err, ProvisionError::ExecFailed { order: 2, .. }),
        "{err:?}"
    );
    // The container is still usable afterwards.
    let (out, _, _) = run(&h.prov, 2, &["echo", "still here"]).await;
    assert_eq!(out, "still here\n");
    h.prov.release(2).await.expect("release");
    let err = h
        .prov
        .exec(2, cmd(&["true"]))
        .await
        .err()
        .expect("no container");
    assert!(
        matches!(err, ProvisionError::NotProvisioned { order: 2 }),
        "{err:?}"
    );
}

async fn signals_are_delivered_and_reported(path: ExecPath) {
    let Some(h) = Harness::busybox_via(path).await else {
        return;
    };
    h.prov.ensure(&lease(3)).await.expect("ensure");
    let p = h.prov.exec(3, cmd(&["sleep", "300"])).await.expect("exec");
    let waiter = p.handle.clone();
    let waiting = tokio::spawn(async move { waiter.wait().await });
    p.handle.signal(15).await.expect("signal");
    let st = tokio::time::timeout(Duration::from_secs(30), p.handle.wait())
        .await
        .expect("exits")
        .expect("wait");
    assert_eq!(st, ExitStatus::Signal(15));
    // A second waiter sees the same status.
    assert_eq!(
        waiting.await.unwrap().expect("wait"),
        ExitStatus::Signal(15)
    );
    // A program that exits with 130 by itself is not mistaken for SIGINT.
    let (_, _, st) = sh(&h.prov, 3, "exit 130").await;
    assert_eq!(st, ExitStatus::Code(130));
    let (_, _, st) = sh(&h.prov, 3, "kill -9 $$").await;
    assert_eq!(st, ExitStatus::Signal(9));
    h.prov.release(3).await.expect("release");
}

async fn closing_stdin_delivers_eof(path: ExecPath) {
    let Some(h) = Harness::busybox_via(path).await else {
        return;
    };
    h.prov.ensure(&lease(4)).await.expect("ensure");
    let mut p = h
        .prov
        .exec(4, cmd(&["sh", "-c", "wc -c; echo done"]))
        .await
        .expect("exec");
    let payload = vec![b'x'; 200_000];
    let mut stdin = p.stdin;
    let writer = tokio::spawn(async move {
        stdin.write_all(&payload).await.expect("write stdin");
        stdin.shutdown().await.expect("EOF");
    });
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(30), p.stdout.read_to_string(&mut out))
        .await
        .expect("output ends")
        .unwrap();
    writer.await.unwrap();
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        vec!["200000", "done"]
    );
    assert_eq!(p.handle.wait().await.unwrap(), ExitStatus::Code(0));

    // The same through the handle, as the gateway does on an SSH EOF.
    let mut p = h.prov.exec(4, cmd(&["cat"])).await.expect("exec");
    p.stdin.write_all(b"hello\n").await.unwrap();
    p.handle.close_stdin().await.expect("close stdin");
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(30), p.stdout.read_to_string(&mut out))
        .await
        .expect("output ends")
        .unwrap();
    assert_eq!(out, "hello\n");
    assert_eq!(p.handle.wait().await.unwrap(), ExitStatus::Code(0));
    h.prov.release(4).await.expect("release");
}

async fn a_pty_has_the_requested_size_and_follows_resizes(path: ExecPath) {
    let Some(h) = Harness::busybox_via(path).await else {
        return;
    };
    h.prov.ensure(&lease(5)).await.expect("ensure");
    let req = ExecRequest {
        argv: argv(&[
            "/bin/sh",
            "-c",
            "stty size; tty; read line; stty size; echo got:$line",
        ]),
        env: vec![("TERM".into(), "xterm".into())],
        tty: Some(PtySize { cols: 80, rows: 24 }),
        cwd: None,
    };
    let mut p = h.prov.exec(5, req).await.expect("exec");
    assert!(p.stderr.is_none());
    let mut seen = String::new();
    read_until("/dev/pts/", &mut seen, &mut p.stdout).await;
    assert!(seen.contains("24 80"), "{seen:?}");
    p.handle
        .resize(PtySize {
            cols: 120,
            rows: 40,
        })
        .await
        .expect("resize");
    p.stdin.write_all(b"abc\n").await.unwrap();
    read_until("got:abc", &mut seen, &mut p.stdout).await;
    assert!(seen.contains("40 120"), "{seen:?}");
    assert_eq!(p.handle.wait().await.unwrap(), ExitStatus::Code(0));
    // The terminal's output ends once the process has exited.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), p.stdout.read_to_end(&mut rest))
        .await
        .expect("pty output reaches EOF")
        .unwrap();
    h.prov.release(5).await.expect("release");
}

async fn read_until(needle: &str, seen: &mut String, out: &mut shale_provisioner::ProcessOutput) {
    let mut buf = [0u8; 1024];
    let fut = async {
        while !seen.contains(needle) {
            let n = out.read(&mut buf).await.expect("read pty");
            assert!(n > 0, "pty closed before {needle:?}; got {seen:?}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    };
    tokio::time::timeout(Duration::from_secs(30), fut)
        .await
        .expect("pty output in time");
}

async fn many_concurrent_execs_in_one_container(path: ExecPath) {
    let Some(h) = Harness::busybox_via(path).await else {
        return;
    };
    h.prov.ensure(&lease(6)).await.expect("ensure");
    let runs = (0..12).map(|i| {
        let prov = h.prov.clone();
        async move { sh(&prov, 6, &format!("sleep 0.2; echo {i}; exit {i}")).await }
    });
    let results = futures_join_all(runs).await;
    for (i, (out, _, st)) in results.into_iter().enumerate() {
        assert_eq!(out, format!("{i}\n"));
        assert_eq!(st, ExitStatus::Code(i as i32));
    }
    h.prov.release(6).await.expect("release");
}

async fn futures_join_all<F: std::future::Future + Send + 'static>(
    futs: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

async fn tcp_reaches_only_the_orders_own_loopback(path: ExecPath) {
    let Some(h) = Harness::busybox_via(path).await else {
        return;
    };
    h.prov.ensure(&lease(7)).await.expect("ensure");
    h.prov.ensure(&lease(8)).await.expect("ensure");
    let server = h
        .prov
        .exec(7, cmd(&["sh", "-c", "echo hello-from-7 | nc -l -p 8080"]))
        .await
        .expect("listen");
    let mut stream = None;
    for _ in 0..100 {
        match h.prov.connect_tcp(7, "127.0.0.1", 8080).await {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(ProvisionError::Connect { .. }) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("{e}"),
        }
    }
    let mut stream = stream.expect("the listener came up");
    let mut got = [0u8; 13];
    tokio::time::timeout(Duration::from_secs(30), stream.read_exact(&mut got))
        .await
        .expect("data in time")
        .unwrap();
    assert_eq!(&got, b"hello-from-7\n");
    drop(stream);
    server.handle.signal(15).await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), server.handle.wait())
        .await
        .expect("server ends")
        .unwrap();

    // Order 8 has its own network namespace: the same port there has no listener...
    let _server7 = h
        .prov
        .exec(7, cmd(&["nc", "-l", "-p", "9090"]))
        .await
        .expect("listen again");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let err = h
        .prov
        .connect_tcp(8, "127.0.0.1", 9090)
        .await
        .expect_err("order 8 cannot reach order 7");
    assert!(
        matches!(
            err,
            ProvisionError::Connect {
                order: 8,
                port: 9090,
                ..
            }
        ),
        "{err:?}"
    );
    // ...its interfaces are its own loopback and its one link out...
    let (out, _, _) = sh(&h.prov, 8, "ls /sys/class/net").await;
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        vec!["eth0", "lo"]
    );
    // ...and order 7's address, where it listens on every interface, is refused at once.
    let (addr7, _, _) = sh(
        &h.prov,
        7,
        "ip -4 -o addr show eth0 2>/dev/null || cat /proc/net/fib_trie",
    )
    .await;
    let addr7 = container_address(&addr7).expect("order 7 has an address on eth0");
    let _wide = h
        .prov
        .exec(7, cmd(&["nc", "-l", "-p", "9091"]))
        .await
        .expect("listen on every interface");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (out, err, st) = sh(
        &h.prov,
        8,
        &format!("echo hi | nc -w 3 {addr7} 9091; echo rc=$?"),
    )
    .await;
    assert_eq!(st, shale_provisioner::ExitStatus::Code(0), "{err}");
    assert!(
        out.contains("rc=1"),
        "order 8 must not reach order 7 at {addr7}: {out} {err}"
    );
    h.prov.release(7).await.expect("release");
    h.prov.release(8).await.expect("release");
}

async fn containerd_going_away_mid_exec_is_a_clear_error(path: ExecPath) {
    let Some(mut h) = Harness::busybox_via(path).await else {
        return;
    };
    if !h.daemon.is_owned() {
        eprintln!("skipped: the shared containerd is not ours to kill");
        return;
    }
    h.prov.ensure(&lease(9)).await.expect("ensure");
    if let ExecPath::Agent = path {
        // The agent's processes do not go through containerd: they outlive it, report their
        // exit, and new ones start while it is away.
        let p = h
            .prov
            .exec(9, cmd(&["sh", "-c", "read x; exit 7"]))
            .await
            .expect("exec");
        h.daemon.kill();
        let (out, _, st) = run(&h.prov, 9, &["echo", "still here"]).await;
        assert_eq!((out.as_str(), st), ("still here\n", ExitStatus::Code(0)));
        let mut stdin = p.stdin;
        stdin.write_all(b"go\n").await.unwrap();
        let waited = tokio::time::timeout(Duration::from_secs(30), p.handle.wait())
            .await
            .expect("wait does not hang");
        assert_eq!(
            waited.expect("an exit status without containerd"),
            ExitStatus::Code(7)
        );
        h.daemon.restart().await.expect("restart");
        let (out, _, _) = run(&h.prov, 9, &["echo", "back"]).await;
        assert_eq!(out, "back\n");
        h.prov.release(9).await.expect("release");
        return;
    }
    let p = h.prov.exec(9, cmd(&["sleep", "300"])).await.expect("exec");
    h.daemon.kill();
    let waited = tokio::time::timeout(Duration::from_secs(30), p.handle.wait())
        .await
        .expect("wait does not hang");
    let err = waited.expect_err("no exit status without containerd");
    assert!(err.is_daemon_unreachable(), "{err:?}");
    let err = h
        .prov
        .exec(9, cmd(&["true"]))
        .await
        .err()
        .expect("exec without containerd fails");
    assert!(err.is_daemon_unreachable(), "{err:?}");

    // Back again, the same provisioner reconnects and the order's container survived.
    h.daemon.restart().await.expect("restart");
    let (out, _, _) = run(&h.prov, 9, &["echo", "back"]).await;
    assert_eq!(out, "back\n");
    h.prov.release(9).await.expect("release");
}

/// The container's eth0 address, from `ip -o addr` or, where there is no `ip`, from the
/// kernel's routing trie (`/proc/net/fib_trie`, whose `/32 host LOCAL` entries are its own).
fn container_address(text: &str) -> Option<String> {
    if let Some(word) = text.split_whitespace().skip_while(|w| *w != "inet").nth(1) {
        return word.split('/').next().map(str::to_string);
    }
    let lines: Vec<&str> = text.lines().collect();
    lines.windows(2).find_map(|w| {
        let addr = w[0].trim().trim_start_matches("|-- ").trim();
        (w[1].contains("/32 host LOCAL") && !addr.starts_with("127.")).then(|| addr.to_string())
    })
}

/// Every case above, on both ways a process starts: through the container's agent (the fast
/// path) and through containerd's exec (the fallback).
macro_rules! on_both_paths {
    ($($case:ident),* $(,)?) => {
        mod agent {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::ExecPath::Agent).await
                }
            )*
        }
        mod containerd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::ExecPath::Containerd).await
                }
            )*
        }
    };
}

on_both_paths!(
    exec_reports_output_streams_and_exit_codes,
    a_missing_program_is_an_exec_error,
    signals_are_delivered_and_reported,
    closing_stdin_delivers_eof,
    a_pty_has_the_requested_size_and_follows_resizes,
    many_concurrent_execs_in_one_container,
    tcp_reaches_only_the_orders_own_loopback,
    containerd_going_away_mid_exec_is_a_clear_error,
);
