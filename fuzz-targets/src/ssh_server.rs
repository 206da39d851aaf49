//! A russh server with the gateway's algorithms (`algorithms::offered`), methods
//! (`connection::methods`), host key (`hostkey::load_or_generate`) and socket wrapper
//! (`preauth::GraceStream`), fed a valid client version line and then arbitrary bytes over an
//! in-memory stream, with a handler that refuses every login and channel. This is what anyone
//! on the internet reaches before authenticating: version exchange, packet framing, KEXINIT
//! negotiation and the key exchange itself.
//!
//! Invariants: no input panics or aborts; the session ends once the client's side is closed
//! (a hang is reported by libFuzzer's `-timeout`); memory stays bounded (`-rss_limit_mb`).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use russh::server::{Config, Handler};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

/// What OpenSSH 9.2 (Debian 12) sends first; the fuzzed bytes follow it.
const CLIENT_ID: &[u8] = b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n";

/// Refuses everything: russh's defaults reject every auth method and every channel.
struct Refuse;

impl Handler for Refuse {
    type Error = russh::Error;
}

struct Fixture {
    runtime: Runtime,
    config: Arc<Config>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let key = shale_gateway::hostkey::load_or_generate(&dir.path().join("host_ed25519"))
            .expect("a host key");
        // The fields of the gateway's own `Config` (gateway.rs) that shape what a client
        // reaches before login; timers are left long, as the gateway's are.
        let config = Config {
            server_id: russh::SshId::Standard("SSH-2.0-Shale_fuzz".into()),
            preferred: shale_gateway::algorithms::offered(),
            methods: shale_gateway::connection::methods(),
            auth_rejection_time: Duration::from_millis(100),
            auth_rejection_time_initial: Some(Duration::ZERO),
            keys: vec![key],
            inactivity_timeout: Some(Duration::from_secs(3600)),
            nodelay: true,
            window_size: 4 * 1024 * 1024,
            channel_buffer_size: 16,
            ..Default::default()
        };
        Fixture {
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime"),
            config: Arc::new(config),
        }
    })
}

/// Runs the target on one input; panics where an invariant breaks.
pub fn run(data: &[u8]) {
    let fx = fixture();
    fx.runtime.block_on(async {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let stream = shale_gateway::preauth::GraceStream::new(server, CancellationToken::new());
        let (mut from_server, mut to_server) = tokio::io::split(client);
        // Drain what the server says, so that it never blocks on a full pipe.
        let drain = tokio::spawn(async move {
            let mut sink = [0u8; 16 * 1024];
            while matches!(from_server.read(&mut sink).await, Ok(n) if n > 0) {}
        });
        let feed = async move {
            let _ = to_server.write_all(CLIENT_ID).await;
            let _ = to_server.write_all(data).await;
            let _ = to_server.shutdown().await;
            // Keep the write half (a dropped half would not close the duplex) until the
            // session is done with it.
            to_server
        };
        let serve = async {
            if let Ok(session) = russh::server::run_stream(fx.config.clone(), stream, Refuse).await
            {
                let _ = session.await;
            }
        };
        let (to_server, ()) = tokio::join!(feed, serve);
        drop(to_server);
        let _ = drain.await;
    });
}
