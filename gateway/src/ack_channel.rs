//! The `shale-ack` subsystem: the gateway's half of the exchange in [`shale_meter::ack`]. It
//! shows the client's tunnel the ticks it has not seen and the order's totals, takes back the
//! tunnel's EIP-712 signature, checks it against the order's acknowledgment key on chain, and
//! stores it for the settler's next claim.
//!
//! Everything the client sends is untrusted: lines are bounded, the signature is recovered and
//! compared, and totals only ever grow (the ledger refuses older ones).

use shale_contracts::ack::Acknowledgment;
use shale_contracts::{Address, Marketplace, B256};
use shale_meter::ack::{AckAnswer, AckLine, AckOffer, AckRequest, MAX_LINE};
use shale_meter::ledger::{now_ms, AckRecord};
use shale_meter::{Head, Ledger};
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt,
};

/// Ticks sent per exchange at most; a tunnel that is further behind catches up over several.
const MAX_TICKS: u32 = 100_000;
const PAGE: u32 = 1_000;

/// What the gateway needs to check acknowledgments: the domain they are signed for, and the
/// chain to read each order's acknowledgment key from.
#[derive(Clone)]
pub struct AckDesk {
    pub chain_id: u64,
    pub market: Marketplace,
}

/// How an exchange ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckOutcome {
    /// The acknowledgment was valid and stored.
    Stored(AckRecord),
    /// The tunnel did not sign, and said why.
    Refused(String),
}

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum AckError {
    #[error("the client's line is not what the exchange expects: {0}")]
    Protocol(String),
    #[error("the signature is not the order's acknowledgment key's (signed by {recovered:?}, key {expected:?})")]
    WrongSigner {
        recovered: Option<Address>,
        expected: Option<Address>,
    },
    #[error(transparent)]
    Ledger(#[from] shale_meter::MeterError),
    #[error(transparent)]
    Chain(#[from] shale_contracts::ChainError),
    #[error("the channel failed: {0}")]
    Io(#[from] std::io::Error),
}

async fn read_line<R: AsyncBufRead + Unpin>(input: &mut R) -> Result<String, AckError> {
    let mut buf = Vec::new();
    let mut limited = input.take(MAX_LINE as u64 + 1);
    limited.read_until(b'\n', &mut buf).await?;
    if buf.last() != Some(&b'\n') {
        return Err(AckError::Protocol(if buf.is_empty() {
            "the client closed the channel".into()
        } else {
            "a line is too long or cut off".into()
        }));
    }
    buf.pop();
    String::from_utf8(buf).map_err(|_| AckError::Protocol("a line is not UTF-8".into()))
}

/// Reads the client's opening line. Public, like [`read_answer`] and [`signature_bytes`], so
/// that the fuzz targets (`fuzz/`) drive the very code that reads what a hostile client sends.
pub async fn read_request<R: AsyncBufRead + Unpin>(input: &mut R) -> Result<AckRequest, AckError> {
    serde_json::from_str(&read_line(input).await?).map_err(|e| AckError::Protocol(e.to_string()))
}

/// Reads the client's answer to the offer.
pub async fn read_answer<R: AsyncBufRead + Unpin>(input: &mut R) -> Result<AckAnswer, AckError> {
    serde_json::from_str(&read_line(input).await?).map_err(|e| AckError::Protocol(e.to_string()))
}

/// Decodes a signed answer's signature: `0x` and 65 bytes of hex, nothing else.
pub fn signature_bytes(signature: &str) -> Result<shale_contracts::Bytes, AckError> {
    signature
        .strip_prefix("0x")
        .and_then(|_| signature.parse::<shale_contracts::Bytes>().ok())
        .filter(|b| b.len() == 65)
        .ok_or_else(|| AckError::Protocol("the signature is not 65 bytes of hex".into()))
}

async fn write_line<W: AsyncWrite + Unpin>(out: &mut W, line: &AckLine) -> Result<(), AckError> {
    let mut text = serde_json::to_vec(line).expect("ack lines serialize");
    text.push(b'\n');
    out.write_all(&text).await?;
    Ok(())
}

/// Runs one exchange for `order` over `input` and `output`.
pub async fn exchange<R, W>(
    ledger: &Ledger,
    desk: &AckDesk,
    order: u64,
    input: R,
    mut output: W,
) -> Result<AckOutcome, AckError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut input = tokio::io::BufReader::new(input);
    let request = read_request(&mut input).await?;
    // The ticks after the client's position, up to the bound; the offer ends where they do.
    let mut last = match request.after_seq {
        Some(seq) => Some(
            ledger
                .tick(order, seq)
                .await?
                .ok_or_else(|| AckError::Protocol(format!("order {order} has no tick {seq}")))?,
        ),
        None => None,
    };
    let mut sent = 0;
    while sent < MAX_TICKS {
        let page = ledger
            .ticks_after(
                order,
                last.as_ref().map(|t| t.seq),
                PAGE.min(MAX_TICKS - sent),
            )
            .await?;
        let Some(tail) = page.last().cloned() else {
            break;
        };
        for t in page {
            write_line(&mut output, &AckLine::Tick(t)).await?;
            sent += 1;
        }
        last = Some(tail);
    }
    let usage = match &last {
        Some(t) => ledger.usage_through(order, t.seq).await?,
        None => Default::default(),
    };
    let offer = AckOffer {
        chain_id: desk.chain_id,
        marketplace: format!("{:#x}", desk.market.address()),
        order,
        seq: last.as_ref().map(|t| t.seq),
        head: last.as_ref().map_or(Head::GENESIS, |t| t.head),
        seconds: usage.seconds,
        bytes_in: usage.bytes_in,
        bytes_out: usage.bytes_out,
    };
    write_line(&mut output, &AckLine::Offer(offer.clone())).await?;
    output.flush().await?;
    let answer = read_answer(&mut input).await?;
    let signature = match answer {
        AckAnswer::Refused { reason } => return Ok(AckOutcome::Refused(reason)),
        AckAnswer::Signed { signature } => signature,
    };
    let result = store(ledger, desk, &offer, &signature).await;
    let reply = match &result {
        Ok(_) => AckLine::Stored,
        Err(e) => AckLine::Error {
            reason: e.to_string(),
        },
    };
    write_line(&mut output, &reply).await?;
    output.flush().await?;
    result.map(AckOutcome::Stored)
}

async fn store(
    ledger: &Ledger,
    desk: &AckDesk,
    offer: &AckOffer,
    signature: &str,
) -> Result<AckRecord, AckError> {
    let bytes = signature_bytes(signature)?;
    let ack = Acknowledgment::new(
        offer.order,
        B256::from(offer.head.0),
        offer.seconds,
        offer.bytes_in,
        offer.bytes_out,
    );
    let recovered = ack.signer(&bytes, desk.chain_id, desk.market.address());
    let expected = desk.market.order(offer.order).await?.ack_signer;
    if recovered.is_none() || recovered != expected {
        return Err(AckError::WrongSigner {
            recovered,
            expected,
        });
    }
    let record = AckRecord {
        order: offer.order,
        head: offer.head,
        seconds: offer.seconds,
        bytes_in: offer.bytes_in,
        bytes_out: offer.bytes_out,
        signature: signature.to_string(),
        received_at_ms: now_ms(),
    };
    ledger.record_ack(&record).await?;
    tracing::info!(
        order = offer.order,
        seq = ?offer.seq,
        seconds = offer.seconds,
        bytes_in = offer.bytes_in,
        bytes_out = offer.bytes_out,
        "acknowledgment stored"
    );
    Ok(record)
}
