//! `shale tunnel` as OpenSSH runs it: a byte-exact relay between stdio and TCP whose wire
//! counts are exact after a clean end and never below what was relayed after a `kill -9`.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};

fn echo_server() -> (u16, std::thread::JoinHandle<u64>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 8192];
        let mut total = 0;
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    total += n as u64;
                    if s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        total
    });
    (port, server)
}

fn counts(path: &std::path::Path) -> (u64, u64) {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    (v["up"].as_u64().unwrap(), v["down"].as_u64().unwrap())
}

#[test]
fn relays_unchanged_and_counts_exactly_after_a_clean_end() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("shale-7.json");
    let (port, server) = echo_server();
    let mut tunnel = Command::new(env!("CARGO_BIN_EXE_shale"))
        .args([
            "tunnel",
            "127.0.0.1",
            &port.to_string(),
            "--step",
            "1000",
            "--counts",
        ])
        .arg(&file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut stdin = tunnel.stdin.take().unwrap();
    let sent = data.clone();
    let writer = std::thread::spawn(move || {
        stdin.write_all(&sent).unwrap();
        // Dropping stdin is ssh closing its side: the tunnel half-closes towards the server.
    });
    let mut echoed = Vec::new();
    tunnel
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut echoed)
        .unwrap();
    writer.join().unwrap();
    assert!(tunnel.wait().unwrap().success());
    assert_eq!(server.join().unwrap(), data.len() as u64);
    assert!(echoed == data, "the relay changed the bytes");
    assert_eq!(counts(&file), (data.len() as u64, data.len() as u64));
}

#[test]
fn a_killed_tunnel_never_counts_less_than_it_relayed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("shale-8.json");
    let (port, _server) = echo_server();
    let mut tunnel = Command::new(env!("CARGO_BIN_EXE_shale"))
        .args([
            "tunnel",
            "127.0.0.1",
            &port.to_string(),
            "--step",
            "4096",
            "--counts",
        ])
        .arg(&file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = tunnel.stdin.take().unwrap();
    let mut stdout = tunnel.stdout.take().unwrap();
    let mut got = 0u64;
    let mut buf = [0u8; 1000];
    for _ in 0..50 {
        stdin.write_all(&[1u8; 1000]).unwrap();
        stdout.read_exact(&mut buf).unwrap();
        got += 1000;
    }
    tunnel.kill().unwrap();
    tunnel.wait().unwrap();
    let (up, down) = counts(&file);
    assert!(
        up >= got && down >= got,
        "counted {up}/{down}, relayed {got}"
    );
    assert!(
        up - got <= 4096 && down - got <= 4096,
        "over-counted by more than a step"
    );
}

#[test]
fn an_unreachable_gateway_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = Command::new(env!("CARGO_BIN_EXE_shale"))
        .args(["tunnel", "127.0.0.1", &port.to_string(), "--counts"])
        .arg(dir.path().join("c.json"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("connecting to 127.0.0.1:{port}")),
        "{err}"
    );
    assert!(
        out.stdout.is_empty(),
        "nothing but relayed bytes may reach ssh's stdin"
    );
}

/// OpenSSH ends its ProxyCommand with SIGHUP when the session is over: the tunnel hands back
/// what it reserved, so the count is exactly what it relayed.
#[test]
fn a_hangup_from_ssh_leaves_the_exact_count() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("shale-9.json");
    let (port, _server) = echo_server();
    let mut tunnel = Command::new(env!("CARGO_BIN_EXE_shale"))
        .args(["tunnel", "127.0.0.1", &port.to_string(), "--counts"])
        .arg(&file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = tunnel.stdin.take().unwrap();
    let mut stdout = tunnel.stdout.take().unwrap();
    let mut buf = [0u8; 777];
    for _ in 0..10 {
        stdin.write_all(&[7u8; 777]).unwrap();
        stdout.read_exact(&mut buf).unwrap();
    }
    unsafe { libc::kill(tunnel.id() as i32, libc::SIGHUP) };
    assert!(tunnel.wait().unwrap().success(), "a hangup is a clean end");
    assert_eq!(counts(&file), (7_770, 7_770));
}
