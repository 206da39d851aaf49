//! One SSH session channel (shell, exec or subsystem) as one process in the order's container.
//!
//! The channel task reads the channel's own message stream: requests (pty, env, exec, shell,
//! subsystem) until the process starts, then stdin, EOF, window changes and signals. The
//! connection's handler has already answered each request with success or failure by the same
//! rules (`policy`), so this task only acts. Bytes move per channel, with no lock shared with
//! other channels and no copy beyond what the SSH transport itself makes.

use std::sync::Arc;

use russh::server::{Handle, Msg};
use russh::{Channel, ChannelMsg, Sig};
use shale_meter::{ChannelCounter, Ledger, Metered, SessionCounter, Side};
use shale_provisioner::{
    ExecRequest, ExitStatus, Machines, Process, ProcessHandle, ProvisionError, PtySize,
};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::either::Either;
use tracing::Instrument;

use crate::ack_policy::{gated, OrderWatch, TransferGate};
use crate::lease_start::LeaseStart;
use crate::leases::{stderr_line, SessionSeat};
use crate::login::OrderId;
use crate::policy::{EnvBudget, EnvPolicy, Subsystem, SFTP_SERVER};

/// How long the output of a lost process is still read before the channel says why and ends:
/// enough for what the pipes already hold, short enough that the user is not left hanging.
const LOST_PROCESS_DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a container start may take before the client is told it is under way.
const START_NOTICE_AFTER: std::time::Duration = std::time::Duration::from_secs(3);
/// How often a slow start tells the client how it goes.
const START_NOTICE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Waits for the order's container; a start that takes long (an image still being pulled, a
/// large disk being made) is told on the channel's stderr, with the bytes the provider's image
/// pulls fetched meanwhile, so the client never stares at a silent hang.
async fn machine_ready(
    ctx: &ChannelContext,
    id: russh::ChannelId,
) -> Result<(), Arc<ProvisionError>> {
    let ready = ctx.lease.ready();
    tokio::pin!(ready);
    let mut notices = tokio::time::interval_at(
        tokio::time::Instant::now() + START_NOTICE_AFTER,
        START_NOTICE_EVERY,
    );
    // Read only once a start is slow: a quick one costs no broker call.
    let mut first: Option<u64> = None;
    loop {
        tokio::select! {
            result = &mut ready => return result,
            _ = notices.tick() => {
                let pulled = match ctx.provisioner.pull_stats().await {
                    Ok(now) if now.in_flight > 0 => {
                        let before = *first.get_or_insert(now.bytes);
                        format!(
                            " (the provider is pulling its image: {} MiB so far)",
                            now.bytes.saturating_sub(before) >> 20
                        )
                    }
                    _ => String::new(),
                };
                let line = format!("shale: starting your machine{pulled}...");
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(2),
                    ctx.handle.extended_data(id, 1, stderr_line(&line)),
                )
                .await;
            }
        }
    }
}

/// What a session channel needs from its connection.
pub struct ChannelContext {
    /// The order whose container runs the process.
    pub order: OrderId,
    /// The container start this channel waits on.
    pub lease: LeaseStart,
    /// Starts processes in containers.
    pub provisioner: Arc<dyn Machines>,
    /// Which environment variables the client may set.
    pub env_policy: Arc<EnvPolicy>,
    /// The SSH connection, for exit signals.
    pub handle: Handle,
    /// The session's seat on the lease board, to receive notices.
    pub seat: Arc<SessionSeat>,
    /// The session's byte counters (billing).
    pub counter: Arc<SessionCounter>,
    /// Whether the pumps count bytes onto `counter` (off only in benchmarks).
    pub count_bytes: bool,
    /// The ledger, for the receipts and acknowledgment subsystems.
    pub ledger: Ledger,
    /// What checks acknowledgments (`shale-ack`).
    pub acks: crate::ack_channel::AckDesk,
    /// The order's unacknowledged bytes, told of each acknowledgment `shale-ack` stores.
    pub ack_watch: Option<Arc<OrderWatch>>,
    /// Holds the process's input and output while the order's transfers are paused (`None`
    /// where the provider's policy never pauses them).
    pub gate: Option<TransferGate>,
    /// Where the time to start a process is recorded.
    pub exec_seconds: prometheus_client::metrics::histogram::Histogram,
    /// Whether the whole command line is logged (`[log] audit_commands`), not just the program.
    pub audit_commands: bool,
    /// The gateway's tasks, where the channel's pumps run.
    pub tasks: crate::tasks::Tasks,
}

/// What the client asked the channel to run.
enum Command {
    Shell,
    Exec(String),
    Subsystem(Subsystem),
}

/// Bytes read from a process at once: large enough to fill an SSH packet (32 KiB) without
/// per-packet syscalls, small enough not to hold a slow client's data in memory.
const READ_CHUNK: usize = 64 * 1024;

/// Serves one session channel until it closes.
pub async fn serve(channel: Channel<Msg>, ctx: ChannelContext) {
    let id = channel.id();
    let span = tracing::info_span!("channel", channel = %id);
    async move {
        ctx.seat.add_channel(id);
        run(channel, &ctx).await;
        ctx.seat.remove_channel(id);
    }
    .instrument(span)
    .await
}

async fn run(channel: Channel<Msg>, ctx: &ChannelContext) {
    let id = channel.id();
    let (mut rx, tx) = channel.split();
    let mut env: Vec<(String, String)> = Vec::new();
    let mut env_budget = EnvBudget::default();
    let mut pty: Option<(String, PtySize)> = None;

    let command = loop {
        match rx.wait().await {
            Some(ChannelMsg::RequestPty {
                term,
                col_width,
                row_height,
                ..
            }) => pty = Some((term, pty_size(col_width, row_height))),
            Some(ChannelMsg::SetEnv {
                variable_name,
                variable_value,
                ..
            }) => {
                if env_budget.admit(&ctx.env_policy, &variable_name, &variable_value) {
                    env.push((variable_name, variable_value));
                }
            }
            Some(ChannelMsg::WindowChange {
                col_width,
                row_height,
                ..
            }) => {
                if let Some((_, size)) = &mut pty {
                    *size = pty_size(col_width, row_height);
                }
            }
            Some(ChannelMsg::RequestShell { .. }) => break Command::Shell,
            Some(ChannelMsg::Exec { command, .. }) => {
                break Command::Exec(String::from_utf8_lossy(&command).into_owned())
            }
            Some(ChannelMsg::RequestSubsystem { name, .. }) => {
                // Unknown subsystems were refused by the handler; the client may ask again.
                if let Some(sub) = Subsystem::named(&name) {
                    break Command::Subsystem(sub);
                }
            }
            Some(ChannelMsg::Close) | None => return,
            Some(_) => {}
        }
    };

    if let Command::Subsystem(Subsystem::Receipts) = command {
        serve_receipts(ctx, &tx).await;
        return;
    }
    if let Command::Subsystem(Subsystem::Ack) = command {
        serve_ack(ctx, &mut rx, &tx).await;
        return;
    }

    let mut request = ExecRequest {
        argv: argv_for(&command),
        env,
        tty: None,
        cwd: None,
    };
    if let Some((term, size)) = pty {
        // A subsystem speaks a binary protocol: never through a terminal.
        if !matches!(command, Command::Subsystem(_)) {
            request.env.retain(|(k, _)| k != "TERM");
            request.env.push(("TERM".into(), term));
            request.tty = Some(size);
        }
    }
    if ctx.audit_commands {
        tracing::info!(command = ?request.argv, tty = request.tty.is_some(), "starting process");
    } else {
        // Clients pass secrets in arguments: only the program reaches the SP's logs.
        let program = program_of(&command);
        tracing::info!(%program, tty = request.tty.is_some(), "starting process");
    }

    let tty = request.tty.is_some();
    let started = async {
        machine_ready(ctx, id).await.map_err(|e| e.to_string())?;
        let _timer = ExecTimer::start(&ctx.exec_seconds);
        match ctx.provisioner.exec(ctx.order.0, request.clone()).await {
            // The container died under the lease (OOM, host restart): start it again, once.
            Err(ProvisionError::NotProvisioned { .. }) => {
                tracing::warn!("the order's container is gone; starting it again");
                ctx.provisioner
                    .ensure(ctx.lease.spec())
                    .await
                    .map_err(|e| e.to_string())?;
                ctx.provisioner
                    .exec(ctx.order.0, request)
                    .await
                    .map_err(|e| e.to_string())
            }
            other => other.map_err(|e| e.to_string()),
        }
    }
    .await;
    let process = match started {
        Ok(p) => p,
        Err(reason) => {
            tracing::warn!(%reason, "process did not start");
            let mut err = tx.make_writer_ext(Some(1));
            let _ = err
                .write_all(format!("shale: {reason}\r\n").as_bytes())
                .await;
            let _ = err.flush().await;
            let _ = tx.exit_status(1).await;
            let _ = tx.eof().await;
            let _ = tx.close().await;
            return;
        }
    };

    let Process {
        stdin,
        stdout,
        stderr,
        handle: proc,
    } = process;
    if let Some(why) = ctx.gate.as_ref().and_then(TransferGate::pause_reason) {
        // Opened while paused: say why nothing moves yet (notices are not metered).
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            ctx.handle.extended_data(id, 1, stderr_line(&why)),
        )
        .await;
    }

    // One end of each pump is metered: what reaches the client is "out", what reaches the
    // process is "in". The counter is this channel's own, so pumps share no lock. The process's
    // end is gated: a paused order's process is neither read nor written.
    let counter = ctx.count_bytes.then(|| ctx.counter.open_channel());
    // The pumps run as tasks of their own but no longer than this channel's task: a process
    // that outlives its session (the container keeps running) must not keep them reading.
    let pumps = tokio_util::sync::CancellationToken::new();
    let _pumps_end_with_the_channel = pumps.clone().drop_guard();
    let out_pump = ctx
        .tasks
        .spawn(pumps.clone().run_until_cancelled_owned(pump(
            gated(stdout, &ctx.gate),
            metered(tx.make_writer(), &counter, Side::Client),
        )));
    let err_pump = stderr.map(|e| {
        ctx.tasks
            .spawn(pumps.clone().run_until_cancelled_owned(pump(
                gated(e, &ctx.gate),
                metered(tx.make_writer_ext(Some(1)), &counter, Side::Client),
            )))
    });
    // The client's side has no end of its own: it is stopped once the process has exited.
    let input_done = pumps.child_token();
    let in_pump = ctx.tasks.spawn(
        input_done
            .clone()
            .run_until_cancelled_owned(client_to_process(
                rx,
                metered(gated(stdin, &ctx.gate), &counter, Side::Container),
                proc.clone(),
                tty,
            )),
    );

    let status = proc.wait().await;
    // Everything the process wrote goes out before its exit status, as with sshd.
    let drained = async {
        let _ = out_pump.await;
        if let Some(p) = err_pump {
            let _ = p.await;
        }
    };
    // A terminal's output ends when the last holder of its slave closes it, which a job left
    // in the background may never do: as sshd, its session ends with the process, after what
    // the terminal still holds has gone out. Pipes are read to their end.
    if status.is_ok() && !tty {
        drained.await;
    } else if tokio::time::timeout(LOST_PROCESS_DRAIN, drained)
        .await
        .is_err()
    {
        // The process was lost (its runtime went away) but a surviving shim still holds its
        // pipes open, so they would never end: stop reading them and say why.
        pumps.cancel();
    }
    input_done.cancel();
    let _ = in_pump.await;
    match status {
        Ok(ExitStatus::Code(code)) => {
            tracing::info!(code, "process exited");
            let _ = tx.exit_status(code as u32).await;
        }
        Ok(ExitStatus::Signal(sig)) => {
            tracing::info!(signal = sig, "process killed by signal");
            let _ = ctx
                .handle
                .exit_signal_request(id, sig_of(sig), false, String::new(), "en".into())
                .await;
        }
        Err(e) => {
            tracing::warn!(error = %e, "lost the process");
            let mut err = tx.make_writer_ext(Some(1));
            let _ = err
                .write_all(format!("\r\nshale: the session's process was lost: {e}\r\n").as_bytes())
                .await;
            let _ = err.flush().await;
            let _ = tx.exit_status(255).await;
        }
    }
    let _ = tx.eof().await;
    let _ = tx.close().await;
}

/// Answers the `shale-ack` subsystem: one acknowledgment exchange with the client's tunnel.
/// Its bytes are metered like any channel's (the tunnel counts them on the wire too), and never
/// paused: a stored acknowledgment is what resumes a paused order, at once.
async fn serve_ack(
    ctx: &ChannelContext,
    rx: &mut russh::ChannelReadHalf,
    tx: &russh::ChannelWriteHalf<Msg>,
) {
    let channel = ctx.counter.open_channel();
    let input = Metered::new(rx.make_reader(), channel.clone(), Side::Client);
    let output = Metered::new(tx.make_writer(), channel, Side::Client);
    let status = match crate::ack_channel::exchange(
        &ctx.ledger,
        &ctx.acks,
        ctx.order.0,
        input,
        output,
    )
    .await
    {
        Ok(crate::ack_channel::AckOutcome::Stored(record)) => {
            if let Some(watch) = &ctx.ack_watch {
                watch.acknowledged(record.bytes_in.saturating_add(record.bytes_out));
            }
            0
        }
        Ok(crate::ack_channel::AckOutcome::Refused(reason)) => {
            tracing::warn!(%reason, "the client's tunnel refused to acknowledge the usage");
            0
        }
        Err(e) => {
            tracing::warn!(error = %e, "acknowledgment exchange failed");
            1
        }
    };
    let _ = tx.exit_status(status).await;
    let _ = tx.eof().await;
    let _ = tx.close().await;
}

/// Answers the `shale-receipts` subsystem: the order's ticks, sessions and claims as JSON lines.
async fn serve_receipts(ctx: &ChannelContext, tx: &russh::ChannelWriteHalf<Msg>) {
    let out = Metered::new(tx.make_writer(), ctx.counter.open_channel(), Side::Client);
    write_receipts(&ctx.ledger, ctx.order, tx, out).await;
}

async fn write_receipts<W>(
    ledger: &Ledger,
    order: OrderId,
    tx: &russh::ChannelWriteHalf<Msg>,
    mut out: W,
) where
    W: AsyncWrite + Unpin,
{
    let status = match ledger.write_receipts(order.0, &mut out).await {
        Ok(lines) => {
            tracing::info!(lines, "receipts sent");
            0
        }
        Err(e) => {
            tracing::warn!(error = %e, "receipts failed");
            let mut err = tx.make_writer_ext(Some(1));
            let _ = err
                .write_all(format!("shale: the receipts could not be read: {e}\n").as_bytes())
                .await;
            let _ = err.flush().await;
            1
        }
    };
    let _ = out.flush().await;
    let _ = tx.exit_status(status).await;
    let _ = tx.eof().await;
    let _ = tx.close().await;
}

/// Serves a session channel of a login that was let in only to be told why it may run nothing
/// (the order ended or ran out of escrow, or has as many sessions as it may): its receipts stay
/// available, so the client can check the final claims; anything else is told `why` on stderr
/// and exits non-zero, which reaches the user in every client mode. Nothing here is billed.
pub async fn serve_receipts_only(
    channel: Channel<Msg>,
    order: OrderId,
    ledger: Ledger,
    why: String,
) {
    let (mut rx, tx) = channel.split();
    loop {
        match rx.wait().await {
            Some(ChannelMsg::RequestSubsystem { name, .. })
                if Subsystem::named(&name) == Some(Subsystem::Receipts) =>
            {
                let out = tx.make_writer();
                write_receipts(&ledger, order, &tx, out).await;
                return;
            }
            Some(ChannelMsg::RequestShell { .. })
            | Some(ChannelMsg::Exec { .. })
            | Some(ChannelMsg::RequestSubsystem { .. }) => {
                let mut err = tx.make_writer_ext(Some(1));
                let line = format!("shale: {why}\r\n");
                let _ = err.write_all(line.as_bytes()).await;
                let _ = err.flush().await;
                let _ = tx.exit_status(255).await;
                let _ = tx.eof().await;
                let _ = tx.close().await;
                return;
            }
            Some(ChannelMsg::Close) | None => return,
            Some(_) => {}
        }
    }
}

/// Records the time to start a process when dropped (also when the start fails).
struct ExecTimer<'a> {
    histogram: &'a prometheus_client::metrics::histogram::Histogram,
    started: std::time::Instant,
}

impl<'a> ExecTimer<'a> {
    fn start(histogram: &'a prometheus_client::metrics::histogram::Histogram) -> Self {
        Self {
            histogram,
            started: std::time::Instant::now(),
        }
    }
}

impl Drop for ExecTimer<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.started.elapsed().as_secs_f64());
    }
}

/// Copies process output to the channel until the process closes it. The channel writer waits
/// for the client's window, so a slow client slows the process instead of filling memory.
async fn pump<R, W>(mut from: R, mut to: W)
where
    R: tokio::io::AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.flush().await;
}

/// `inner`, counted onto `counter` as seen from `side`; left alone where byte counting is off.
fn metered<S>(
    inner: S,
    counter: &Option<Arc<ChannelCounter>>,
    side: Side,
) -> Either<Metered<S>, S> {
    match counter {
        Some(counter) => Either::Left(Metered::new(inner, counter.clone(), side)),
        None => Either::Right(inner),
    }
}

/// Feeds the client's stdin, EOF, window changes and signals to the process. A terminal has no
/// end of input (sshd keeps it open too): closing it would hang the process up, which is what
/// containerd's shim does when its console's stdin ends.
async fn client_to_process<W>(
    mut rx: russh::ChannelReadHalf,
    mut stdin: W,
    proc: ProcessHandle,
    tty: bool,
) where
    W: AsyncWrite + Unpin,
{
    loop {
        match rx.wait().await {
            Some(ChannelMsg::Data { data }) => {
                if stdin.write_all(&data).await.is_err() {
                    // The process closed its stdin; keep serving signals and resizes.
                    continue;
                }
            }
            Some(ChannelMsg::Eof) => {
                let _ = stdin.flush().await;
                if tty {
                    continue;
                }
                if let Err(e) = proc.close_stdin().await {
                    tracing::debug!(error = %e, "closing stdin");
                }
            }
            Some(ChannelMsg::WindowChange {
                col_width,
                row_height,
                ..
            }) => {
                let _ = proc.resize(pty_size(col_width, row_height)).await;
            }
            Some(ChannelMsg::Signal { signal }) => {
                if let Some(n) = signal_number(&signal) {
                    let _ = proc.signal(n).await;
                }
            }
            Some(ChannelMsg::Close) | None => {
                // The client went away: hang up, as a closed terminal would.
                let _ = proc.signal(SIGHUP).await;
                return;
            }
            Some(_) => {}
        }
    }
}

/// Longest program name logged: a command line is the client's, so even its first word is kept
/// short.
const PROGRAM_LOG_MAX: usize = 64;

/// What the logs say a channel runs when the command line is not audited: the program alone.
/// For an exec request that is the shell command line's first word after any `NAME=value`
/// assignments (which often carry tokens), cut at the first shell metacharacter.
fn program_of(command: &Command) -> String {
    match command {
        Command::Shell => "shell".into(),
        Command::Subsystem(sub) => format!("subsystem {}", sub.name()),
        Command::Exec(line) => {
            let word = line
                .split_whitespace()
                .find(|w| !is_assignment(w))
                .unwrap_or("");
            let program: String = word
                .chars()
                .filter(|c| !matches!(c, '\'' | '"'))
                .take_while(|c| !matches!(c, ';' | '|' | '&' | '<' | '>' | '(' | ')' | '$' | '`'))
                .take(PROGRAM_LOG_MAX)
                .collect();
            if program.is_empty() {
                "(no program)".into()
            } else {
                program
            }
        }
    }
}

/// Whether a shell word is a variable assignment (`TOKEN=abc`), not a program.
fn is_assignment(word: &str) -> bool {
    match word.split_once('=') {
        Some((name, _)) => {
            !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        }
        None => false,
    }
}

fn argv_for(command: &Command) -> Vec<String> {
    match command {
        // A login shell, so /etc/profile sets PATH and the prompt as users expect.
        Command::Shell => vec!["/bin/bash".into(), "-l".into()],
        // As sshd does: the user's shell interprets the command line.
        Command::Exec(line) => vec!["/bin/sh".into(), "-c".into(), line.clone()],
        Command::Subsystem(Subsystem::Sftp) => vec![SFTP_SERVER.into()],
        // Answered by the gateway itself, never run in the container.
        Command::Subsystem(Subsystem::Receipts) | Command::Subsystem(Subsystem::Ack) => Vec::new(),
    }
}

/// `ssh -tt` without a local terminal asks for 0x0; a PTY needs at least one cell.
fn pty_size(cols: u32, rows: u32) -> PtySize {
    PtySize {
        cols: cols.clamp(1, u16::MAX as u32) as u16,
        rows: rows.clamp(1, u16::MAX as u32) as u16,
    }
}

/// What a closed terminal sends its foreground process.
const SIGHUP: i32 = 1;

/// Signal numbers on Linux for the names RFC 4254 defines.
fn signal_number(sig: &Sig) -> Option<i32> {
    Some(match sig {
        Sig::HUP => 1,
        Sig::INT => 2,
        Sig::QUIT => 3,
        Sig::ILL => 4,
        Sig::ABRT => 6,
        Sig::FPE => 8,
        Sig::KILL => 9,
        Sig::USR1 => 10,
        Sig::SEGV => 11,
        Sig::PIPE => 13,
        Sig::ALRM => 14,
        Sig::TERM => 15,
        Sig::Custom(name) => match name.as_str() {
            "USR2" => 12,
            "CONT" => 18,
            "STOP" => 19,
            "TSTP" => 20,
            "WINCH" => 28,
            _ => return None,
        },
    })
}

/// The RFC 4254 name of a Linux signal number, for `exit-signal`.
fn sig_of(n: i32) -> Sig {
    match n {
        1 => Sig::HUP,
        2 => Sig::INT,
        3 => Sig::QUIT,
        4 => Sig::ILL,
        6 => Sig::ABRT,
        8 => Sig::FPE,
        9 => Sig::KILL,
        10 => Sig::USR1,
        11 => Sig::SEGV,
        13 => Sig::PIPE,
        14 => Sig::ALRM,
        15 => Sig::TERM,
        12 => Sig::Custom("USR2".into()),
        other => Sig::Custom(format!("SIG{other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_names_and_numbers_round_trip() {
        for n in [1, 2, 3, 4, 6, 8, 9, 10, 11, 12, 13, 14, 15] {
            assert_eq!(signal_number(&sig_of(n)), Some(n), "{n}");
        }
        assert_eq!(signal_number(&Sig::Custom("BOGUS".into())), None);
    }

    #[test]
    fn a_zero_sized_pty_is_clamped_to_one_cell() {
        assert_eq!((pty_size(0, 0).cols, pty_size(0, 0).rows), (1, 1));
        assert_eq!(pty_size(100_000, 50).cols, u16::MAX);
    }

    #[test]
    fn only_the_program_of_a_command_line_is_logged() {
        let program = |line: &str| program_of(&Command::Exec(line.into()));
        assert_eq!(
            program("curl -H 'Authorization: Bearer s3cret' https://x"),
            "curl"
        );
        assert_eq!(
            program("  /usr/bin/env python3 train.py --token abc"),
            "/usr/bin/env"
        );
        assert_eq!(program("HF_TOKEN=hf_abc AWS_KEY=k python3 x.py"), "python3");
        assert_eq!(program("mysql -pS3cret;rm -rf /tmp/x"), "mysql");
        assert_eq!(program("echo $SECRET|wc"), "echo");
        assert_eq!(program("ls;cat secret"), "ls");
        assert_eq!(program("'my tool' --key=k"), "my");
        assert_eq!(program(""), "(no program)");
        assert_eq!(program("A=1"), "(no program)");
        // `=` in a program's name is no assignment (the part before is not a variable name).
        assert_eq!(program("./a=b --x"), "./a=b");
        assert_eq!(program(&"x".repeat(500)).len(), PROGRAM_LOG_MAX);
        assert_eq!(program_of(&Command::Shell), "shell");
        assert_eq!(
            program_of(&Command::Subsystem(Subsystem::Sftp)),
            "subsystem sftp"
        );
        for line in [
            "curl -H 'Authorization: Bearer s3cret' https://x",
            "TOKEN=s3cret ./run",
            "mysql -ps3cret",
        ] {
            assert!(!program(line).contains("s3cret"), "{line}");
        }
    }

    #[test]
    fn exec_runs_through_the_shell_and_sftp_through_sftp_server() {
        assert_eq!(
            argv_for(&Command::Exec("echo hi | wc -c".into())),
            ["/bin/sh", "-c", "echo hi | wc -c"]
        );
        assert_eq!(
            argv_for(&Command::Subsystem(Subsystem::Sftp)),
            [SFTP_SERVER]
        );
    }
}
