//! One SSH connection: a thin translator from russh's callbacks to the gateway's rules.
//!
//! Authentication checks the order named by the username before any key is looked at, so an
//! unknown, unaccepted or ended order is refused at once, with its reason sent to the user as the
//! SSH disconnect message (OpenSSH prints it). A wrong key is refused per key, so a client with
//! several keys in its agent still gets in with the right one; when it has run out of keys its next
//! method (keyboard-interactive, always refused) carries the reason instead.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use russh::keys::PublicKey;
use russh::server::{
    Auth, ChannelOpenHandle, Handle, Msg, PublicKeyOffer, Session, VerifiedPublicKey,
};
use russh::{Channel, ChannelId, ChannelOpenFailure, Disconnect, MethodKind, MethodSet};
use shale_contracts::Order;
use shale_meter::SessionCounter;
use tracing::Span;

use crate::admission::{admit_key, admit_order, wrong_key, Refusal};
use crate::gateway::Shared;
use crate::lease_start::LeaseStart;
use crate::leases::{SessionId, SessionSeat};
use crate::login::{parse_login, OrderId};
use crate::metrics::Metrics;
use crate::policy::{check_forward, Subsystem};
use crate::{forward, session_channel};

/// Keys a client may offer before the gateway stops listening and tells it why.
const MAX_WRONG_KEYS: u32 = 8;

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
    /// Set when the order may no longer run anything but its receipts may still be read: why.
    receipts_only: Option<Refusal>,
}

impl Connection {
    /// A connection from `peer`; `handle` is filled in as soon as russh has made the session.
    pub fn new(
        shared: Arc<Shared>,
        peer: Option<SocketAddr>,
        handle: Arc<OnceLock<Handle>>,
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
            receipts_only: None,
        }
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
        if let Some(ip) = self.peer.map(|p| p.ip()) {
            if self.shared.limiter.is_blocked(ip) {
                return Err(Refusal::RateLimited);
            }
        }
        let id = parse_login(user)?;
        self.span.record("order", id.0);
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
            Err(refusal) => return Ok(self.refuse(refusal).await),
        };
        // Billing starts with the lease; nothing is served that cannot be recorded.
        let lease = match self.shared.start_billing(&order).await {
            Ok(lease) => lease,
            Err(e) => {
                tracing::error!(parent: &self.span, error = %e, "cannot meter the order");
                return Ok(self.refuse(Refusal::LedgerUnavailable).await);
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
            return Ok(self
                .refuse(Refusal::EscrowExhausted(OrderId(order.id)))
                .await);
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
            return Ok(self.refuse(Refusal::LedgerUnavailable).await);
        }
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
        if self.receipts_only.is_some() {
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
            );
            let lease = LeaseStart::begin(
                self.shared.provisioner.clone(),
                order,
                self.shared.metrics.provisioning_seconds.clone(),
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
                tokio::spawn(async move {
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
        if let (Some(why), Some((_, order))) = (&self.receipts_only, &self.order) {
            reply.accept().await;
            tokio::spawn(tracing::Instrument::instrument(
                session_channel::serve_receipts_only(
                    channel,
                    OrderId(order.id),
                    self.shared.billing.ledger().clone(),
                    why.to_string(),
                ),
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
            exec_seconds: self.shared.metrics.exec_seconds.clone(),
        };
        let span = self.span.clone();
        tokio::spawn(tracing::Instrument::instrument(
            session_channel::serve(channel, ctx),
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
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
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
        Metrics::count(&self.shared.metrics.channels_opened, "direct-tcpip");
        let span = self.span.clone();
        tokio::spawn(tracing::Instrument::instrument(
            forward::serve(
                channel,
                reply,
                OrderId(order.id),
                forward::Target {
                    host: host_to_connect.to_string(),
                    port,
                },
                lease.clone(),
                self.shared.provisioner.clone(),
                counter.open_channel(),
            ),
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
        if self.shared.env_policy.allows(variable_name, variable_value) {
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
    /// Writes a one-line notice on a channel's stderr.
    fn tell(&self, session: &mut Session, channel: ChannelId, line: &str) {
        let _ = session.extended_data(channel, 1, format!("shale: {line}\r\n").into_bytes());
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if let Some(counter) = self.counter.take() {
            self.shared.metrics_session_ended(counter.bytes());
            let ledger = self.shared.billing.ledger().clone();
            let session = self.session.to_string();
            let span = self.span.clone();
            // The connection is gone; the record is written after it, off the session loop.
            tokio::spawn(async move {
                let bytes = counter.bytes();
                if let Err(e) = ledger
                    .record_session_end(
                        &session,
                        shale_meter::ledger::now_ms(),
                        bytes,
                        counter.channels_opened(),
                        "closed",
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
