//! The real default image (Debian, built by `image/build-default.sh`): what an order's user
//! expects is there and works, including the SFTP server the gateway runs. Also prints the
//! time from `ensure` to the first output of an exec and the cost of one extra exec.

mod common;

use std::time::{Duration, Instant};

use common::*;
use shale_provisioner::ExitStatus;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_image_has_python_numpy_sftp_and_rsync() {
    let h = Harness::start(TestImage::Default, |_| {}).await;

    let started = Instant::now();
    h.prov.ensure(&lease(51)).await.expect("ensure");
    let mut p = h
        .prov
        .exec(51, cmd(&["echo", "ready"]))
        .await
        .expect("exec");
    let mut first = [0u8; 1];
    p.stdout.read_exact(&mut first).await.expect("first byte");
    let to_first_output = started.elapsed();
    p.handle.wait().await.expect("wait");

    let n = 10u32;
    let started = Instant::now();
    for _ in 0..n {
        let (_, _, st) = run(&h.prov, 51, &["true"]).await;
        assert_eq!(st, ExitStatus::Code(0));
    }
    let per_exec = started.elapsed() / n;
    eprintln!("timing: ensure -> first exec output {to_first_output:?}; one extra exec (start to exit) {per_exec:?}");

    let (out, err, st) = run(
        &h.prov,
        51,
        &[
            "python3",
            "-c",
            "import numpy; print(int(numpy.arange(10).sum()))",
        ],
    )
    .await;
    assert_eq!((out.as_str(), st), ("45\n", ExitStatus::Code(0)), "{err}");
    let (out, err, st) = sh(&h.prov, 51, "whoami; echo $HOME; bash -c 'echo bash ok'; rsync --version | head -1 | tr -s ' ' | cut -d' ' -f1-2; ps -o pid= -p 1").await;
    assert_eq!(st, ExitStatus::Code(0), "{out}{err}");
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    assert_eq!(
        lines,
        vec!["user", "/work", "bash ok", "rsync version", "1"]
    );
    let (_, _, st) = sh(
        &h.prov,
        51,
        "test -s /etc/ssl/certs/ca-certificates.crt && ip -o link show lo",
    )
    .await;
    assert_eq!(st, ExitStatus::Code(0));

    // clone(CLONE_NEWUSER) is refused by the seccomp filter (the host kernel would allow it).
    let probe = "import ctypes, os\n\
libc = ctypes.CDLL(None, use_errno=True)\n\
pid = libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0)\n\
if pid == 0: os._exit(0)\n\
if pid > 0: os.waitpid(pid, 0); print('cloned')\n\
else: print('errno', ctypes.get_errno())\n";
    let (out, err, _) = run(&h.prov, 51, &["python3", "-c", probe]).await;
    assert_eq!(out.trim(), "errno 1", "{err}");

    // The filter is an allowlist: calls that need no capability but are not on it (kcmp on
    // oneself, a NUMA policy) are refused, while ordinary ones (a thread, a socket pair, ptrace
    // of one's own child by strace-like tools) go through.
    let probe = r#"
import ctypes, os, socket, threading
libc = ctypes.CDLL(None, use_errno=True)
def call(nr, *args):
    r = libc.syscall(nr, *args)
    return r if r >= 0 else -ctypes.get_errno()
me = os.getpid()
print('kcmp', call(312, me, me, 0, 0, 0))
print('set_mempolicy', call(238, 0, 0, 0))
t = threading.Thread(target=lambda: None); t.start(); t.join()
a, b = socket.socketpair(); a.send(b'x'); print('socketpair', b.recv(1))
pid = os.fork()
if pid == 0:
    libc.ptrace(0, 0, 0, 0); os._exit(7)
print('child', os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"#;
    let (out, err, st) = run(&h.prov, 51, &["python3", "-c", probe]).await;
    assert_eq!(st, ExitStatus::Code(0), "{err}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        vec!["kcmp -1", "set_mempolicy -1", "socketpair b'x'", "child 7"],
        "{err}"
    );

    // The SFTP server answers SSH_FXP_INIT (version 3) with SSH_FXP_VERSION.
    let mut sftp = h
        .prov
        .exec(51, cmd(&["/usr/lib/openssh/sftp-server"]))
        .await
        .expect("sftp-server");
    sftp.stdin
        .write_all(&[0, 0, 0, 5, 1, 0, 0, 0, 3])
        .await
        .unwrap();
    let mut header = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(30), sftp.stdout.read_exact(&mut header))
        .await
        .expect("reply")
        .unwrap();
    assert_eq!(header[4], 2, "SSH_FXP_VERSION");
    sftp.handle.close_stdin().await.unwrap();
    let st = tokio::time::timeout(Duration::from_secs(30), sftp.handle.wait())
        .await
        .expect("sftp ends")
        .unwrap();
    assert_eq!(st, ExitStatus::Code(0));
    h.prov.release(51).await.expect("release");
}
