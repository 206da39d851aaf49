//! Files and ports through the gateway with the stock tools: scp, sftp, rsync, `ssh -L`.

use std::io::{Read, Write};
use std::path::Path;

use sha2::{Digest, Sha256};
use shale_tests::ssh::run;
use shale_tests::{OrderOptions, Stack};

fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut hasher = Sha256::new();
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

fn random_file(path: &Path, bytes: usize) -> anyhow::Result<()> {
    let mut urandom = std::fs::File::open("/dev/urandom")?;
    let mut out = std::fs::File::create(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len());
        urandom.read_exact(&mut buf[..n])?;
        out.write_all(&buf[..n])?;
        left -= n;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_100_mib_file_round_trips_through_scp_legacy_scp_and_sftp_unchanged() -> anyhow::Result<()>
{
    let stack = Stack::start().await?;
    let key = stack.key("alice", "ed25519")?;
    let order = stack.order(&key, OrderOptions::default()).await?;
    let target = stack.target(order.to_string(), &key);
    let dir = stack.dir.path().to_path_buf();
    let upload = dir.join("upload.bin");
    random_file(&upload, 100 << 20)?;
    let expected = sha256_file(&upload)?;

    let t = target.clone();
    let up = upload.clone();
    let out = tokio::task::spawn_blocking(move || {
        let mut cmd = t.scp();
        cmd.arg(&up).arg(t.remote("big.bin"));
        run(cmd)
    })
    .await??;
    assert_eq!(out.code, Some(0), "scp upload: {out:?}");

    // The container sees exactly the bytes sent.
    let mut cmd = target.ssh();
    cmd.arg("sha256sum big.bin");
    let out = tokio::task::spawn_blocking(move || run(cmd)).await??;
    assert_eq!(
        out.stdout.split_whitespace().next(),
        Some(expected.as_str()),
        "{out:?}"
    );

    let batch = dir.join("sftp.batch");
    let download = dir.join("download.bin");
    std::fs::write(&batch, format!("get big.bin {}\n", download.display()))?;
    let t = target.clone();
    let out = tokio::task::spawn_blocking(move || run(t.sftp(&batch))).await??;
    assert_eq!(out.code, Some(0), "sftp download: {out:?}");
    assert_eq!(sha256_file(&download)?, expected);

    let again = dir.join("again.bin");
    let t = target.clone();
    let a = again.clone();
    let out = tokio::task::spawn_blocking(move || {
        let mut cmd = t.scp();
        cmd.arg(t.remote("big.bin")).arg(&a);
        run(cmd)
    })
    .await??;
    assert_eq!(out.code, Some(0), "scp download: {out:?}");
    assert_eq!(sha256_file(&again)?, expected);

    // Legacy scp (-O) runs `scp -f` in the container over an exec channel instead of SFTP.
    let legacy = dir.join("legacy.bin");
    let t = target.clone();
    let l = legacy.clone();
    let out = tokio::task::spawn_blocking(move || {
        let mut cmd = t.scp();
        cmd.arg("-O").arg(t.remote("big.bin")).arg(&l);
        run(cmd)
    })
    .await??;
    assert_eq!(out.code, Some(0), "scp -O download: {out:?}");
    assert_eq!(sha256_file(&legacy)?, expected);
    stack.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn rsync_copies_a_directory_tree_into_the_container() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let key = stack.key("bob", "ed25519")?;
    let order = stack.order(&key, OrderOptions::default()).await?;
    let target = stack.target(order.to_string(), &key);
    let tree = stack.dir.path().join("tree");
    for (path, size) in [
        ("a.txt", 10),
        ("sub/b.bin", 70_000),
        ("sub/deeper/c.bin", 1_000_000),
        ("empty", 0),
    ] {
        let p = tree.join(path);
        std::fs::create_dir_all(p.parent().unwrap())?;
        random_file(&p, size)?;
    }
    let local = std::process::Command::new("sh")
        .arg("-c")
        .arg("find . -type f | sort | xargs sha256sum")
        .current_dir(&tree)
        .output()?;
    let local = String::from_utf8(local.stdout)?;

    let t = target.clone();
    let src = format!("{}/", tree.display());
    let out = tokio::task::spawn_blocking(move || {
        let mut cmd = std::process::Command::new("rsync");
        cmd.args(["-a", "-e", &t.rsync_shell(), &src, &t.remote("tree/")]);
        run(cmd)
    })
    .await??;
    assert_eq!(out.code, Some(0), "rsync: {out:?}");

    let mut cmd = target.ssh();
    cmd.arg("cd tree && find . -type f | sort | xargs sha256sum");
    let out = tokio::task::spawn_blocking(move || run(cmd)).await??;
    assert_eq!(out.stdout, local, "{out:?}");
    stack.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn ssh_l_reaches_a_server_inside_the_container_and_nothing_else() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let key = stack.key("carol", "ed25519")?;
    let order = stack.order(&key, OrderOptions::default()).await?;
    let target = stack.target(order.to_string(), &key);

    // A web server on the container's own loopback, as Jupyter would run.
    let mut cmd = target.ssh();
    cmd.arg("echo hello-from-the-container > index.html; nohup python3 -m http.server 8888 --bind 127.0.0.1 >/dev/null 2>&1 & sleep 1; echo started");
    let out = tokio::task::spawn_blocking(move || run(cmd)).await??;
    assert_eq!(out.stdout.trim(), "started", "{out:?}");

    let local_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let mut forward = target.ssh();
    forward
        .args(["-N", "-o", "ExitOnForwardFailure=yes", "-L"])
        .arg(format!("{local_port}:localhost:8888"));
    let mut child = forward.spawn()?;

    let mut body = String::new();
    for _ in 0..100 {
        if let Ok(mut tcp) = tokio::net::TcpStream::connect(("127.0.0.1", local_port)).await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            tcp.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").await?;
            body.clear();
            let _ = tcp.read_to_string(&mut body).await;
            if body.contains("hello-from-the-container") {
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(body.contains("hello-from-the-container"), "{body:?}");

    // A name that cannot resolve is refused from inside the order's namespace, with no DNS query.
    let mut cmd = target.ssh();
    cmd.args(["-W", "example.invalid:80"]);
    let out = tokio::task::spawn_blocking(move || run(cmd)).await??;
    assert_ne!(out.code, Some(0), "{out:?}");
    assert!(out.stderr.contains("stdio forwarding failed"), "{out:?}");
    stack.stop().await
}
