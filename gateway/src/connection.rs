//! One SSH connection: a thin translator from russh's callbacks to the gateway's rules.
//!
//! Authentication checks the order named by the username before any key is looked at, so an
//! unknown or unaccepted order is refused at once, with its reason sent to the user as the SSH
//! disconnect message (OpenSSH prints it in every mode, `BatchMode` and `LogLevel=ERROR`
//! included). A wrong key is refused per key, so a client with several keys in its agent still
//! gets in with the right one; when it has run out of keys its next method (keyboard-interactive,
//! always refused) carries the reason instead. Refusals found once the key is verified (the order
//! ended, ran out of escrow, has all the sessions it may, usage cannot be recorded) let the client
//! in and say why on the channel's stderr with a non-zero exit, which every client shows.
//!
//! Costly work is throttled per source, never a login the cache can check: a source with many
//! failures is only kept from chain lookups (see `ratelimit`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use russh::keys::PublicKey;
use russh::server::{
    Auth, ChannelOpenHandle, Handle, Msg, PublicKeyOffer, Session, VerifiedPublicKey,
};
use russh::{Channel, ChannelId, ChannelOpenFailure, Disconnect, MethodKind, MethodSet};
use shale_contracts::Order;
use shale_meter::SessionCounter;
use tokio_util::sync::CancellationToken;
use tracing::Span;

use crate::ack_policy::{OrderWatch, Reporting};
use crate::admission::{admit_key, admit_order, wrong_key, Refusal};
use crate::lease_start::LeaseStart;
use crate::leases::{SessionId, SessionSeat};
use crate::login::{parse_login, OrderId};
use crate::metrics::Metrics;
use crate::policy::{check_forward, EnvBudget, Subsystem};
use crate::preauth::StartupTicket;
use crate::shared::Shared;
use crate::{forward, session_channel};

/// Keys a client may offer before the gateway stops listening and tells it why.
const MAX_WRONG_KEYS: u32 = 8;

/// How long a login let in only to be told why it may run nothing is kept open: long enough
/// for its client to open a channel and read the reason, not so long that it holds a connection.
const REFUSED_LINGER: Duration = Duration::from_secs(30);

/// A session's end record's outcome when the client closed it (or its connection broke), rather
/// than the gateway cutting it for a reason.
pub const SESSION_CLOSED: &str = "closed";

/// How long a channel's task may go on once its session is closed: enough for a process that
/// exits on the hang-up to report, not so long that shutdown waits on one that ignores it.
const CHANNEL_LINGER: Duration = Duration::from_secs(2);

/// Runs a channel's task until it ends, or [`CHANNEL_LINGER`] after its session is `closed`
/// (cut, left, or the gateway stopping), so no channel task outlives its connection for long.
async fn until_closed(task: impl std::future::Future<Output = ()>, closed: CancellationToken) {
    tokio::select! {
        () = task => {}
        () = async {
            closed.cancelled().await;
            tokio::time::sleep(CHANNEL_LINGER).await;
        } => tracing::debug!("the channel outlived its session; dropped"),
    }
}

/// What the connection holds until it has logged in.
pub struct PreAuth {
    /// Its place among the unauthenticated connections; freed at login.
    pub ticket: Option<StartupTicket>,
    /// Cancelled at login, which stops the login grace timer.
    pub logged_in: CancellationToken,
}

/// The state of one SSH connection.
pub struct Connection {
    shared: Arc<Shared>,
    peer: Option<SocketAddr>,
    session: SessionId,
    handle: Arc<OnceLock<Handle>>,
    span: Span,
    /// The order the username named, once read and admitted.
    order: Option<(String, Arc<Order>)>,
    /// The reason to give if the client runs out of keys.
    pending_refusal: Option<Refusal>,
    wrong_keys: u32,
    seat: Option<Arc<SessionSeat>>,
    lease: Option<LeaseStart>,
    /// This session's byte counters, once admitted.
    counter: Option<Arc<SessionCounter>>,
    /// The order's unacknowledged bytes, held while the session lives.
    ack_watch: Option<Arc<OrderWatch>>,
    /// Set when the login was let in only to be told why it may run nothing (its receipts may
    /// still be read): what its channels say.
    receipts_only: Option<Refusal>,
    pre_auth: PreAuth,
    /// Session channels open now on this connection, against `max_channels`.
    session_channels: Arc<AtomicUsize>,
    /// What each channel's env requests have used.
    env_budgets: HashMap<ChannelId, EnvBudget>,
}

/// A session channel's place under the connection's `max_channels`; freed on drop.
struct ChannelSlot(Arc<AtomicUsize>);

impl Drop for ChannelSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Connection {
    /// A connection from `peer`; `handle` is filled in as soon as russh has made the session.
    pub fn new(
        shared: Arc<Shared>,
        peer: Option<SocketAddr>,
        handle: Arc<OnceLock<Handle>>,
        pre_auth: PreAuth,
    ) -> Self {
        let session = SessionId::random();
        let span = tracing::info_span!("session", session = %session, peer = ?peer, order = tracing::field::Empty);
        Self {
            shared,
            peer,
            session,
            handle,
            span,
            order: None,
            pending_refusal: None,
            wrong_keys: 0,
            seat: None,
            lease: None,
            counter: None,
            ack_watch: None,
            receipts_only: None,
            pre_auth,
            session_channels: Arc::default(),
            env_budgets: HashMap::new(),
        }
    }

    /// Lets the client in only to tell it `refusal` on each channel it opens (and to serve its
    /// receipts), and closes the connection soon after. For refusals found after the key is
    /// verified: a disconnect reason reaches stock `ssh`, but stderr and an exit status reach
    /// every client and script.
    fn accept_to_explain(&mut self, refusal: Refusal) -> Auth {
        {
            let _enter = self.span.enter();
            tracing::info!(reason = refusal.reason(), "let in to be told: {refusal}");
        }
        self.shared.metrics_auth_failure(refusal.reason());
        self.seat = None;
        self.receipts_only = Some(refusal);
        Auth::Accept
    }

    /// Ends the connection with `refusal` as the message the user reads.
    async fn refuse(&mut self, refusal: Refusal) -> Auth {
        {
            let _enter = self.span.enter();
            tracing::info!(reason = refusal.reason(), "refused: {refusal}");
        }
        self.shared.metrics_auth_failure(refusal.reason());
        if let Some(ip) = self.peer.map(|p| p.ip()) {
            if !matches!(refusal, Refusal::RateLimited | Refusal::ShuttingDown) {
                self.shared.limiter.record(ip);
            }
        }
        if let Some(handle) = self.handle.get().cloned() {
            let text = refusal.to_string();
            // Queued now, so the session loop sends it before it reads the client's next
            // request; the queue is empty during authentication, so this does not wait.
            let queued = tokio::time::timeout(
                std::time::Duration::from_millis(100),
                handle.disconnect(Disconnect::NoMoreAuthMethodsAvailable, text, "en".into()),
            )
            .await;
            if !matches!(queued, Ok(Ok(()))) {
                tracing::debug!("could not queue the refusal's disconnect");
            }
        }
        // Keep methods on offer: a client told "nothing left" gives up before the disconnect
        // (and its reason) arrives; one that tries again reads the reason instead.
        Auth::Reject {
            proceed_with_methods: Some(methods()),
            partial_success: false,
        }
    }

    /// Reads and admits the order `user` names, once per username.
    async fn order_for(&mut self, user: &str) -> Result<Arc<Order>, Refusal> {
        if let Some((named, order)) = &self.order {
            if named == user {
                return Ok(order.clone());
            }
        }
        let id = parse_login(user)?;
        self.span.record("order", id.0);
        // A source past its failures may still log in to what the cache knows; it only may not
        // make the gateway ask the chain.
        if let Some(ip) = self.peer.map(|p| p.ip()) {
            if self.shared.limiter.is_blocked(ip)
                && !self.shared.orders.answers_from_cache(id).await
            {
                return Err(Refusal::RateLimited);
            }
        }
        let order = self.shared.orders.get(id).await?;
        let verdict = admit_order(&order, self.shared.provider, crate::unix_now()).and_then(|()| {
            if self.shared.billing.still_exhausted(&order) {
                Err(Refusal::EscrowExhausted(id))
            } else {
                Ok(())
            }
        });
        match verdict {
            Ok(()) => self.receipts_only = None,
            // The order's own key may still read its receipts (to check the final claims);
            // everything else is refused with this reason once the session opens a channel.
            Err(
                refusal @ (Refusal::Ended(_) | Refusal::EscrowExhausted(_) | Refusal::Cancelled(_)),
            ) => self.receipts_only = Some(refusal),
            Err(refusal) => return Err(refusal),
        }
        self.order = Some((user.to_string(), order.clone()));
        Ok(order)
    }

    async fn check_key(&mut self, order: &Order, key: &PublicKey) -> Auth {
        match admit_key(order, key) {
            Ok(()) => Auth::Accept,
            Err(refusal) => {
                self.wrong_keys += 1;
                if self.wrong_keys >= MAX_WRONG_KEYS {
                    return self.refuse(refusal).await;
                }
                self.pending_refusal = Some(refusal);
                Auth::Reject {
                    proceed_with_methods: Some(methods()),
                    partial_success: false,
                }
            }
        }
    }
}

/// Public keys, plus keyboard-interactive only to tell a client that ran out of keys why.
pub fn methods() -> MethodSet {
    let mut set = MethodSet::empty();
    set.push(MethodKind::PublicKey);
    set.push(MethodKind::KeyboardInteractive);
    set
}

impl russh::server::Handler for Connection {
    type Error = russh::Error;

    async fn auth_none(&mut self, user: &str) -> Result<Auth, Self::Error> {
        match self.order_for(user).await {
            Ok(_) => Ok(Auth::Reject {
                proceed_with_methods: Some(methods()),
                partial_success: false,
            }),
            Err(refusal) => Ok(self.refuse(refusal).await),
        }
    }

    async fn auth_password(&mut self, user: &str, _password: &str) -> Result<Auth, Self::Error> {
        // Not advertised; a client that tries anyway learns what is wrong with its login.
        match self.order_for(user).await {
            Ok(order) => Ok(self.refuse(wrong_key(&order)).await),
            Err(refusal) => Ok(self.refuse(refusal).await),
        }
    }

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        match self.order_for(user).await {
            Ok(order) => Ok(self.check_key(&order, offer.public_key).await),
            Err(refusal) => Ok(self.refuse(refusal).await),
        }
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let order = match self.order_for(user).await {
            Ok(order) => order,
            Err(refusal) => return Ok(self.refuse(refusal).await),
        };
        // Only a key already accepted when offered gets here with a valid signature; check again
        // all the same, since a client may sign without offering first.
        if let Err(refusal) = admit_key(&order, key.public_key) {
            return Ok(self.refuse(refusal).await);
        }
        if let Some(why) = &self.receipts_only {
            tracing::info!(parent: &self.span, reason = why.reason(), "authenticated for receipts only");
            return Ok(Auth::Accept);
        }
        let Some(handle) = self.handle.get().cloned() else {
            return Ok(self.refuse(Refusal::ShuttingDown).await);
        };
        let seat = match self
            .shared
            .board
            .join(OrderId(order.id), self.session, handle)
        {
            Ok(seat) => seat,
            Err(Refusal::ShuttingDown) => return Ok(self.refuse(Refusal::ShuttingDown).await),
            Err(refusal) => return Ok(self.accept_to_explain(refusal)),
        };
        // Billing starts with the lease; nothing is served that cannot be recorded.
        let lease = match self.shared.start_billing(&order).await {
            Ok(lease) => lease,
            Err(e) => {
                tracing::error!(parent: &self.span, error = %e, "cannot meter the order");
                drop(seat);
                return Ok(self.accept_to_explain(Refusal::LedgerUnavailable));
            }
        };
        if self
            .shared
            .billing
            .runway(&order)
            .is_some_and(|r| r.exhausted())
        {
            // Nothing runs for an order that cannot pay: close the meter just started.
            self.shared.billing.mark_exhausted(&order);
            self.shared.billing.end(OrderId(order.id)).await;
            drop(seat);
            return Ok(self.accept_to_explain(Refusal::EscrowExhausted(OrderId(order.id))));
        }
        let counter = lease.open_session();
        let peer = self.peer.map(|p| p.to_string()).unwrap_or_default();
        if let Err(e) = self
            .shared
            .billing
            .ledger()
            .record_session_start(
                &self.session.to_string(),
                order.id,
                &peer,
                shale_meter::ledger::now_ms(),
            )
            .await
        {
            tracing::error!(parent: &self.span, error = %e, "cannot record the session");
            drop(seat);
            return Ok(self.accept_to_explain(Refusal::LedgerUnavailable));
        }
        self.ack_watch = Some(self.shared.billing.acknowledgments().join(
            &order,
            lease,
            Reporting {
                board: self.shared.board.clone(),
                ledger: self.shared.billing.ledger().clone(),
                unacknowledged: self.shared.metrics.order_unacknowledged_bytes.clone(),
                paused: self.shared.metrics.order_transfers_paused.clone(),
            },
        ));
        seat.meter(counter.clone());
        self.seat = Some(Arc::new(seat));
        self.counter = Some(counter);
        tracing::info!(
            parent: &self.span,
            key = %key.public_key.fingerprint(russh::keys::HashAlg::Sha256),
            "authenticated"
        );
        Ok(Auth::Accept)
    }

    async fn auth_keyboard_interactive<'a>(
        &'a mut self,
        user: &str,
        _submethods: &str,
        response: Option<russh::server::Response<'a>>,
    ) -> Result<Auth, Self::Error> {
        if response.is_some() {
            // The reason was shown and the disconnect is queued behind it; nothing more to say.
            return Ok(Auth::Reject {
                proceed_with_methods: Some(methods()),
                partial_success: false,
            });
        }
        let refusal = match self.pending_refusal.take() {
            Some(r) => r,
            None => match self.order_for(user).await {
                Ok(order) => wrong_key(&order),
                Err(r) => r,
            },
        };
        let text = refusal.to_string();
        self.refuse(refusal).await;
        // An info request with no prompts: OpenSSH shows its instructions and answers at once,
        // then reads the queued disconnect, which carries the reason even at LogLevel=ERROR.
        Ok(Auth::Partial {
            name: "".into(),
            instructions: format!("shale: {text}").into(),
            prompts: Vec::new().into(),
        })
    }

    async fn auth_succeeded(&mut self, session: &mut Session) -> Result<(), Self::Error> {
        // Logged in: no longer counted against the pre-auth limits or the grace time.
        self.pre_auth.ticket = None;
        self.pre_auth.logged_in.cancel();
        self.shared.metrics.unauthenticated.dec();
        if let Some(why) = &self.receipts_only {
            let handle = session.handle();
            let line = why.to_string();
            self.shared.tasks.spawn_until_stopped(async move {
                tokio::time::sleep(REFUSED_LINGER).await;
                let _ = handle
                    .disconnect(Disconnect::ByApplication, line, "en".into())
                    .await;
            });
            return Ok(());
        }
        if let Some((_, order)) = &self.order {
            let id = OrderId(order.id);
            crate::quality::measure_round_trip(
                session,
                self.shared.metrics.session_rtt_seconds.clone(),
                self.shared.billing.ledger().clone(),
                id,
                self.session.to_string(),
                &self.shared.tasks,
            );
            let lease = LeaseStart::begin(
                self.shared.provisioner.clone(),
                order,
                self.shared.metrics.provisioning_seconds.clone(),
                &self.shared.tasks,
            );
            // What the client really gets, measured once the container runs in this lease.
            if self.shared.quality.due(id, crate::quality::PROBE_EVERY) {
                let (quality, provisioner, ledger, lease, session) = (
                    self.shared.quality.clone(),
                    self.shared.provisioner.clone(),
                    self.shared.billing.ledger().clone(),
                    lease.clone(),
                    self.session.to_string(),
                );
                self.shared.tasks.spawn_until_stopped(async move {
                    if lease.ready().await.is_ok() {
                        quality.probe(provisioner, ledger, id, session).await;
                    }
                });
            }
            self.lease = Some(lease);
            self.shared.metrics_session_started();
        }
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(slot) = self.channel_slot() else {
            let limit = self.shared.max_channels;
            Metrics::count_reason(&self.shared.metrics.channels_refused, "max_channels");
            tracing::info!(parent: &self.span, limit, "refused a session channel past the cap");
            reply
                .reject(ChannelOpenFailure::Other {
                    code: ChannelOpenFailure::ResourceShortage.code(),
                    reason: format!("at most {limit} sessions may be open on one connection (the provider's max_channels); close one or connect again"),
                })
                .await;
            return Ok(());
        };
        if let (Some(why), Some((_, order))) = (&self.receipts_only, &self.order) {
            reply.accept().await;
            let line = match why {
                Refusal::Ended(_) | Refusal::EscrowExhausted(_) | Refusal::Cancelled(_) => {
                    format!(
                        "{why}; its receipts remain: `ssh {}@HOST -s shale-receipts`",
                        order.id
                    )
                }
                _ => why.to_string(),
            };
            let ledger = self.shared.billing.ledger().clone();
            let id = OrderId(order.id);
            // Ends with its channel, which ends with the connection.
            self.shared.tasks.spawn(tracing::Instrument::instrument(
                async move {
                    let _slot = slot;
                    session_channel::serve_receipts_only(channel, id, ledger, line).await
                },
                self.span.clone(),
            ));
            return Ok(());
        }
        let (Some((_, order)), Some(lease), Some(seat), Some(handle), Some(counter)) = (
            &self.order,
            &self.lease,
            &self.seat,
            self.handle.get(),
            &self.counter,
        ) else {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        reply.accept().await;
        Metrics::count(&self.shared.metrics.channels_opened, "session");
        crate::quality::measure_round_trip(
            session,
            self.shared.metrics.session_rtt_seconds.clone(),
            self.shared.billing.ledger().clone(),
            OrderId(order.id),
            self.session.to_string(),
            &self.shared.tasks,
        );
        let ctx = session_channel::ChannelContext {
            order: OrderId(order.id),
            lease: lease.clone(),
            provisioner: self.shared.provisioner.clone(),
            env_policy: self.shared.env_policy.clone(),
            handle: handle.clone(),
            seat: seat.clone(),
            counter: counter.clone(),
            count_bytes: self.shared.count_bytes,
            ledger: self.shared.billing.ledger().clone(),
            acks: self.shared.acks.clone(),
            ack_watch: self.ack_watch.clone(),
            gate: self.gate(),
            exec_seconds: self.shared.metrics.exec_seconds.clone(),
            audit_commands: self.shared.audit_commands,
            tasks: self.shared.tasks.clone(),
        };
        let span = self.span.clone();
        let closed = seat.closed();
        self.shared.tasks.spawn(tracing::Instrument::instrument(
            async move {
                let _slot = slot;
                until_closed(session_channel::serve(channel, ctx), closed).await
            },
            span,
        ));
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let (Some((_, order)), Some(lease), Some(counter)) =
            (&self.order, &self.lease, &self.counter)
        else {
            let reason = match &self.receipts_only {
                Some(why) => why.to_string(),
                None => "not logged in".to_string(),
            };
            reply
                .reject(ChannelOpenFailure::Other {
                    code: ChannelOpenFailure::AdministrativelyProhibited.code(),
                    reason,
                })
                .await;
            return Ok(());
        };
        let port = match check_forward(host_to_connect, port_to_connect) {
            Ok(port) => port,
            Err(refusal) => {
                let _enter = self.span.enter();
                tracing::info!(
                    host = host_to_connect,
                    port = port_to_connect,
                    %refusal,
                    "refused a forward"
                );
                reply
                    .reject(ChannelOpenFailure::Other {
                        code: ChannelOpenFailure::AdministrativelyProhibited.code(),
                        reason: refusal.to_string(),
                    })
                    .await;
                return Ok(());
            }
        };
        let Some(slot) = self.shared.forwards.take(OrderId(order.id)) else {
            let limit = self.shared.forwards.max_per_order();
            Metrics::count_reason(&self.shared.metrics.channels_refused, "max_forwards");
            tracing::info!(parent: &self.span, limit, "refused a forward past the order's cap");
            reply
                .reject(ChannelOpenFailure::Other {
                    code: ChannelOpenFailure::ResourceShortage.code(),
                    reason: format!("order {} already has {limit} forwarded connections open, the most it may have; close some and try again", order.id),
                })
                .await;
            return Ok(());
        };
        Metrics::count(&self.shared.metrics.channels_opened, "direct-tcpip");
        tracing::info!(
            parent: &self.span,
            destination = %format_args!("{host_to_connect}:{port}"),
            "accepted a forward"
        );
        let span = self.span.clone();
        let closed = match &self.seat {
            Some(seat) => seat.closed(),
            None => CancellationToken::new(),
        };
        let serve = forward::serve(
            channel,
            reply,
            forward::Target {
                host: host_to_connect.to_string(),
                port,
            },
            forward::ForwardContext {
                order: OrderId(order.id),
                lease: lease.clone(),
                provisioner: self.shared.provisioner.clone(),
                counter: counter.open_channel(),
                slot,
                gate: self.gate(),
            },
        );
        self.shared.tasks.spawn(tracing::Instrument::instrument(
            until_closed(serve, closed),
            span,
        ));
        Ok(())
    }

    async fn channel_open_x11(
        &mut self,
        _channel: Channel<Msg>,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)?;
        Ok(())
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        variable_name: &str,
        variable_value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // The same budget as the channel's task keeps, so both agree on what was set.
        let budget = self.env_budgets.entry(channel).or_default();
        if budget.admit(&self.shared.env_policy, variable_name, variable_value) {
            session.channel_success(channel)?;
        } else {
            session.channel_failure(channel)?;
        }
        Ok(())
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)?;
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)?;
        Ok(())
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if Subsystem::named(name).is_some() {
            session.channel_success(channel)?;
        } else {
            let _enter = self.span.enter();
            tracing::info!(subsystem = name, "refused an unknown subsystem");
            session.channel_failure(channel)?;
        }
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.env_budgets.remove(&channel);
        Ok(())
    }

    async fn window_change_request(
        &mut self,
        _channel: ChannelId,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // The channel task applies it; window-change wants no reply.
        Ok(())
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single_connection: bool,
        _x11_auth_protocol: &str,
        _x11_auth_cookie: &str,
        _x11_screen_number: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.tell(session, channel, "X11 forwarding is not offered by Shale");
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn agent_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        self.tell(session, channel, "agent forwarding is not offered by Shale");
        Ok(false)
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let _enter = self.span.enter();
        tracing::info!(address, port = *port, "refused remote forwarding");
        let _ = session;
        Ok(false)
    }
}

impl Connection {
    /// A place for one more session channel on this connection, unless it has `max_channels`.
    fn channel_slot(&self) -> Option<ChannelSlot> {
        let limit = self.shared.max_channels;
        self.session_channels
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| ChannelSlot(self.session_channels.clone()))
    }

    /// What holds this session's transfers while its order's are paused, if the policy pauses.
    fn gate(&self) -> Option<crate::ack_policy::TransferGate> {
        let (watch, seat) = (self.ack_watch.as_ref()?, self.seat.as_ref()?);
        watch.gate(seat.closed())
    }

    /// Writes a one-line notice on a channel's stderr.
    fn tell(&self, session: &mut Session, channel: ChannelId, line: &str) {
        let _ = session.extended_data(channel, 1, format!("shale: {line}\r\n").into_bytes());
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Channel tasks may outlive the connection while paused; they give up now.
        if let Some(seat) = &self.seat {
            seat.closed().cancel();
        }
        if !self.pre_auth.logged_in.is_cancelled() {
            self.shared.metrics.unauthenticated.dec();
        }
        if let Some(counter) = self.counter.take() {
            self.shared.metrics_session_ended(counter.bytes());
            let ledger = self.shared.billing.ledger().clone();
            let session = self.session.to_string();
            let span = self.span.clone();
            // Cut by the gateway (the order ended, its escrow ran out, shutdown), or left.
            let outcome = self
                .seat
                .as_ref()
                .and_then(|seat| seat.cut_for())
                .unwrap_or(SESSION_CLOSED);
            // The connection is gone; the record is written after it, off the session loop, and
            // shutdown waits for it.
            self.shared.tasks.spawn(async move {
                let bytes = counter.bytes();
                let channels = counter.channels_opened();
                tracing::info!(
                    parent: &span,
                    reason = outcome,
                    bytes_in = bytes.bytes_in,
                    bytes_out = bytes.bytes_out,
                    channels,
                    "session ended"
                );
                if let Err(e) = ledger
                    .record_session_end(
                        &session,
                        shale_meter::ledger::now_ms(),
                        bytes,
                        channels,
                        outcome,
                    )
                    .await
                {
                    tracing::warn!(parent: &span, error = %e, "cannot record the session's end");
                }
            });
        }
        let _enter = self.span.enter();
        tracing::debug!("connection closed");
    }
}
