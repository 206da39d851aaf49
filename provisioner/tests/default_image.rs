//! The real default image (Debian 12, built by `image/build-default.sh`): what a client renting
//! a machine expects is there and works (root with bash as its login shell, apt and dpkg, python3
//! with pip, venv and numpy, a C and C++ compiler and make, git, curl, wget, tmux, an editor, a
//! pager, a UTF-8 locale), including the SFTP server the gateway runs. Also prints the time from
//! `ensure` to the first output of an exec and the cost of one extra exec.

mod common;

use std::time::{Duration, Instant};

use common::*;
use shale_provisioner::ExitStatus;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_image_is_a_debian_machine_to_work_on() {
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
    // Root inside (the order's own uid range outside), home /work, bash as the login shell, and
    // apt's sandbox user, which apt switches to for every download.
    let (out, err, st) = sh(
        &h.prov,
        51,
        "id -u; id -g; whoami; echo $HOME; getent passwd root | cut -d: -f6-; \
         getent passwd _apt | cut -d: -f3,4; bash -c 'echo bash ok'; \
         rsync --version | head -1 | tr -s ' ' | cut -d' ' -f1-2; ps -o pid= -p 1",
    )
    .await;
    assert_eq!(st, ExitStatus::Code(0), "{out}{err}");
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    assert_eq!(
        lines,
        vec![
            "0",
            "0",
            "root",
            "/work",
            "/work:/bin/bash",
            "42:65534",
            "bash ok",
            "rsync version",
            "1"
        ]
    );

    // Every command a client reaches for is on PATH.
    let (out, err, st) = sh(
        &h.prov,
        51,
        "for c in apt apt-get dpkg dpkg-deb dpkg-scanpackages python3 pip pip3 git curl wget \
         gcc g++ cc make rsync tmux vi less ps top ip ss locale bash scp; do \
         command -v \"$c\" >/dev/null || echo \"missing $c\"; done",
    )
    .await;
    assert_eq!((out.as_str(), st), ("", ExitStatus::Code(0)), "{err}");

    // Debian 12 whose apt points at the Debian archive (release, updates, security), with a
    // consistent package database and no package lists or .debs left in the image.
    let (out, err, st) = sh(
        &h.prov,
        51,
        ". /etc/os-release; echo \"$ID $VERSION_ID $VERSION_CODENAME\"; \
         grep '^deb ' /etc/apt/sources.list; \
         apt-get check -qq && echo apt ok; dpkg --audit && echo dpkg ok; \
         find /var/lib/apt/lists /var/cache/apt -name '*.deb' -o -name '*_Packages*' | wc -l",
    )
    .await;
    assert_eq!(st, ExitStatus::Code(0), "{out}{err}");
    assert_eq!(
        out.lines().map(str::trim).collect::<Vec<_>>(),
        vec![
            "debian 12 bookworm",
            "deb http://deb.debian.org/debian bookworm main",
            "deb http://deb.debian.org/debian bookworm-updates main",
            "deb http://deb.debian.org/debian-security bookworm-security main",
            "apt ok",
            "dpkg ok",
            "0"
        ],
        "{err}"
    );

    // pip is allowed to install system-wide (Debian's PEP 668 marker would refuse it), and venv
    // makes an environment with its own pip.
    let (out, err, st) = sh(
        &h.prov,
        51,
        "pip --version | cut -d' ' -f1; pip config list | grep break-system-packages; \
         python3 -m venv /tmp/venv && /tmp/venv/bin/python -c 'import sys; print(sys.prefix)' \
         && /tmp/venv/bin/pip --version | cut -d' ' -f1",
    )
    .await;
    assert_eq!(st, ExitStatus::Code(0), "{out}{err}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        vec![
            "pip",
            "global.break-system-packages='true'",
            "/tmp/venv",
            "pip"
        ],
        "{err}"
    );

    // build-essential: C and C++ compile and run, make is there.
    let (out, err, st) = sh(
        &h.prov,
        51,
        r#"cd /tmp && printf '#include <stdio.h>\nint main(void) { printf("%%d\\n", 6 * 7); return 0; }\n' > t.c \
           && gcc -O2 -o t t.c && ./t \
           && printf '#include <iostream>\nint main() { std::cout << "c++ ok" << std::endl; }\n' > t.cc \
           && g++ -o tt t.cc && ./tt && make --version | head -1 | cut -d' ' -f1-2"#,
    )
    .await;
    assert_eq!(st, ExitStatus::Code(0), "{out}{err}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        vec!["42", "c++ ok", "GNU Make"],
        "{err}"
    );

    // A UTF-8 locale by default, and en_US.UTF-8 (what ssh clients often send) generated: setting
    // it prints no warning.
    let (out, err, st) = sh(
        &h.prov,
        51,
        "echo $LANG; locale -a | grep -x -e C.utf8 -e en_US.utf8; LC_ALL=en_US.UTF-8 locale charmap",
    )
    .await;
    assert_eq!(st, ExitStatus::Code(0), "{out}{err}");
    assert_eq!(
        (out.lines().collect::<Vec<_>>(), err.as_str()),
        (vec!["C.UTF-8", "C.utf8", "en_US.utf8", "UTF-8"], "")
    );

    // The rest of the toolbox, TLS roots, and `ip` for port forwarding.
    let (out, err, st) = sh(
        &h.prov,
        51,
        "git --version | cut -d' ' -f1-2; curl --version | head -1 | cut -d' ' -f1; \
         wget --version | head -1 | cut -d' ' -f1-2; tmux -V | cut -d' ' -f1; \
         vi --version | head -1 | cut -d' ' -f1-4; readlink -f /usr/bin/vi; \
         less --version | head -1 | cut -d' ' -f1; \
         test -s /etc/ssl/certs/ca-certificates.crt && echo certs; ip -o link show lo | cut -d' ' -f2",
    )
    .await;
    assert_eq!(st, ExitStatus::Code(0), "{out}{err}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        vec![
            "git version",
            "curl",
            "GNU Wget",
            "tmux",
            "VIM - Vi IMproved",
            "/usr/bin/vim.tiny",
            "less",
            "certs",
            "lo:"
        ],
        "{err}"
    );

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
