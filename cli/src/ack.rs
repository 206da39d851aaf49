//! The tunnel's side of acknowledgments: the order's acknowledgment key, the position it last
//! verified, and the judgment of what the gateway offers.
//!
//! The tunnel signs only what it can check itself: a tick chain that continues the one it
//! verified before, totals that are that chain's sums, bytes at or below its own wire counts,
//! and seconds at or below the lease's time by the clock.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use shale_contracts::ack::Acknowledgment;
use shale_contracts::{Address, PrivateKeySigner, B256};
use shale_meter::ack::AckOffer;
use shale_meter::tick::verify_chain_from;
use shale_meter::Deployment;
use shale_meter::{ChainHead, Head, Tick};

use crate::wire::WireTotals;

/// An order's acknowledgment key: a secp256k1 key of its own, kept in a 0600 file. It can only
/// acknowledge usage; it controls no funds.
pub struct AckKey {
    path: PathBuf,
}

impl AckKey {
    /// The key file at `path`.
    pub fn at(path: impl Into<PathBuf>) -> Self {
        AckKey { path: path.into() }
    }

    /// Makes a new random key, replacing any old one; returns its address.
    pub fn create(&self) -> anyhow::Result<Address> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let key = PrivateKeySigner::random();
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        writeln!(f, "0x{}", hex(key.to_bytes().as_slice()))?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)
            .with_context(|| format!("writing {}", self.path.display()))?;
        Ok(key.address())
    }

    /// Loads the key.
    pub fn load(&self) -> anyhow::Result<PrivateKeySigner> {
        let text = std::fs::read_to_string(&self.path)
            .with_context(|| format!("reading the acknowledgment key {}", self.path.display()))?;
        text.trim()
            .parse::<PrivateKeySigner>()
            .with_context(|| format!("{} is not a private key", self.path.display()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where the tunnel's checking stands: the last position it verified (and acknowledged).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verified {
    pub seq: Option<u64>,
    pub head: Head,
    pub seconds: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl Verified {
    /// The position kept at `path`; the genesis when there is none yet.
    pub fn load(path: &Path) -> anyhow::Result<Verified> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text)
                .with_context(|| format!("{} is not a verified position", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Verified::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Keeps the position at `path`.
    pub fn store(&self, path: &Path) -> anyhow::Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_string(self)?)?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
    }
}

/// What the offer must be about.
#[derive(Debug, Clone)]
pub struct Expected {
    pub chain_id: u64,
    pub marketplace: Address,
    pub order: u64,
    /// The most lease seconds there can be by now (the lease's time by the clock, plus slack).
    pub max_seconds: u64,
}

/// Checks `offer` and the ticks sent before it; returns the acknowledgment to sign and the new
/// verified position, or why it must not be signed.
pub fn judge(
    expected: &Expected,
    from: &Verified,
    ticks: &[Tick],
    offer: &AckOffer,
    wire: WireTotals,
) -> Result<(Acknowledgment, Verified), String> {
    let marketplace: Address = offer
        .marketplace
        .parse()
        .map_err(|_| format!("the offer names marketplace {:?}", offer.marketplace))?;
    if offer.chain_id != expected.chain_id
        || marketplace != expected.marketplace
        || offer.order != expected.order
    {
        return Err(format!(
            "the offer is for order {} on chain {} at {}, not this one",
            offer.order, offer.chain_id, offer.marketplace
        ));
    }
    if ticks.iter().any(|t| t.order != expected.order) {
        return Err("the gateway sent ticks of another order".into());
    }
    let start = from.seq.map(|seq| ChainHead {
        seq,
        head: from.head,
    });
    let head = if ticks.is_empty() {
        from.head
    } else {
        let deployment = Deployment::new(expected.chain_id, expected.marketplace.0 .0);
        verify_chain_from(&deployment, start, ticks)
            .map_err(|e| format!("the tick chain does not verify: {e}"))?
    };
    let seq = ticks.last().map(|t| t.seq).or(from.seq);
    if head != offer.head || seq != offer.seq {
        return Err(format!(
            "the offer's head {} (seq {:?}) is not where the ticks lead ({head}, seq {seq:?})",
            offer.head, offer.seq
        ));
    }
    let mut sums = (from.seconds, from.bytes_in, from.bytes_out);
    for t in ticks {
        sums.0 = sums.0.saturating_add(t.seconds);
        sums.1 = sums.1.saturating_add(t.bytes_in);
        sums.2 = sums.2.saturating_add(t.bytes_out);
    }
    if sums != (offer.seconds, offer.bytes_in, offer.bytes_out) {
        return Err(format!(
            "the offer's totals ({} s, {} B in, {} B out) are not the ticks' ({} s, {} B in, {} B out)",
            offer.seconds, offer.bytes_in, offer.bytes_out, sums.0, sums.1, sums.2
        ));
    }
    if offer.bytes_in > wire.up || offer.bytes_out > wire.down {
        return Err(format!(
            "the provider counts {} B in and {} B out, but this tunnel relayed only {} B up and \
             {} B down: an over-claim",
            offer.bytes_in, offer.bytes_out, wire.up, wire.down
        ));
    }
    if offer.seconds > expected.max_seconds {
        return Err(format!(
            "the provider counts {} s, but the lease has run at most {} s",
            offer.seconds, expected.max_seconds
        ));
    }
    let ack = Acknowledgment::new(
        expected.order,
        B256::from(offer.head.0),
        offer.seconds,
        offer.bytes_in,
        offer.bytes_out,
    );
    let verified = Verified {
        seq,
        head,
        seconds: offer.seconds,
        bytes_in: offer.bytes_in,
        bytes_out: offer.bytes_out,
    };
    Ok((ack, verified))
}

#[cfg(test)]
mod tests {
    use super::*;
    use shale_contracts::U256;
    use shale_meter::{Tariff, TickChain, Usage};

    /// `n` ticks of `order` on the marketplace of [`expected`].
    fn chain(order: u64, n: usize) -> Vec<Tick> {
        chain_on(Address::repeat_byte(9), order, n)
    }

    fn chain_on(marketplace: Address, order: u64, n: usize) -> Vec<Tick> {
        let tariff = Tariff::new(U256::from(1), U256::from(1)).unwrap();
        let deployment = Deployment::new(31337, marketplace.0 .0);
        let mut chain = TickChain::genesis(deployment.order_key(order), tariff);
        (0..n)
            .map(|i| {
                let t = chain.prepare(
                    1_000 * i as u64,
                    Usage {
                        seconds: 10,
                        bytes_in: 100,
                        bytes_out: 1_000,
                    },
                );
                chain.commit(&t).unwrap();
                t
            })
            .collect()
    }

    fn offer_for(ticks: &[Tick]) -> AckOffer {
        AckOffer {
            chain_id: 31337,
            marketplace: format!("{:#x}", Address::repeat_byte(9)),
            order: 7,
            seq: ticks.last().map(|t| t.seq),
            head: ticks.last().map(|t| t.head).unwrap_or_default(),
            seconds: ticks.iter().map(|t| t.seconds).sum(),
            bytes_in: ticks.iter().map(|t| t.bytes_in).sum(),
            bytes_out: ticks.iter().map(|t| t.bytes_out).sum(),
        }
    }

    fn expected() -> Expected {
        Expected {
            chain_id: 31337,
            marketplace: Address::repeat_byte(9),
            order: 7,
            max_seconds: 1_000,
        }
    }

    const WIRE: WireTotals = WireTotals {
        up: 10_000,
        down: 100_000,
    };

    #[test]
    fn an_honest_offer_is_acknowledged_and_the_next_continues_from_it() {
        let ticks = chain(7, 4);
        let (ack, at) = judge(
            &expected(),
            &Verified::default(),
            &ticks[..2],
            &offer_for(&ticks[..2]),
            WIRE,
        )
        .unwrap();
        assert_eq!((ack.seconds, ack.bytesIn, ack.bytesOut), (20, 200, 2_000));
        assert_eq!(at.seq, Some(1));
        let (ack, at) = judge(&expected(), &at, &ticks[2..], &offer_for(&ticks), WIRE).unwrap();
        assert_eq!((ack.seconds, ack.bytesOut, at.seq), (40, 4_000, Some(3)));
        // Nothing new: the same position is offered again.
        assert!(judge(&expected(), &at, &[], &offer_for(&ticks), WIRE).is_ok());
    }

    #[test]
    fn an_over_claim_a_forged_total_or_a_foreign_offer_is_refused() {
        let ticks = chain(7, 3);
        let tight = WireTotals {
            up: 10_000,
            down: 2_999,
        };
        let why = judge(
            &expected(),
            &Verified::default(),
            &ticks,
            &offer_for(&ticks),
            tight,
        )
        .unwrap_err();
        assert!(why.contains("over-claim"), "{why}");
        let mut inflated = offer_for(&ticks);
        inflated.bytes_out += 1;
        assert!(judge(&expected(), &Verified::default(), &ticks, &inflated, WIRE).is_err());
        let mut foreign = offer_for(&ticks);
        foreign.chain_id = 314159;
        assert!(judge(&expected(), &Verified::default(), &ticks, &foreign, WIRE).is_err());
        // The same order id's ticks, chained on another marketplace: an offer for this one over
        // them does not verify (their heads could only ever be paid there).
        let theirs = chain_on(Address::repeat_byte(8), 7, 3);
        let why = judge(
            &expected(),
            &Verified::default(),
            &theirs,
            &offer_for(&theirs),
            WIRE,
        )
        .unwrap_err();
        assert!(why.contains("does not verify"), "{why}");
        let short = Expected {
            max_seconds: 29,
            ..expected()
        };
        assert!(judge(
            &short,
            &Verified::default(),
            &ticks,
            &offer_for(&ticks),
            WIRE
        )
        .is_err());
        // A chain that skips a tick does not verify.
        let gap = [ticks[0].clone(), ticks[2].clone()];
        assert!(judge(
            &expected(),
            &Verified::default(),
            &gap,
            &offer_for(&ticks),
            WIRE
        )
        .is_err());
    }

    #[test]
    fn the_key_file_is_private_and_loads_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = AckKey::at(dir.path().join("acks/shale-7.key"));
        let address = key.create().unwrap();
        assert_eq!(key.load().unwrap().address(), address);
        let mode = std::fs::metadata(dir.path().join("acks/shale-7.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

/// How the tunnel reaches the gateway's `shale-ack` subsystem and what it checks against.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// The Shale ssh config with the order's Host entry.
    pub ssh_config: PathBuf,
    /// The Host alias, `shale-N`.
    pub alias: String,
    /// The `shale` binary, for the inner connection's own (ack-less) tunnel.
    pub exe: PathBuf,
    /// The order's wire-count file.
    pub counts: PathBuf,
    /// The order's acknowledgment key.
    pub key: PathBuf,
    /// What offers must be about; `max_seconds` is recomputed from `accepted_at` each time.
    pub expected: Expected,
    /// When the lease started, Unix seconds (from the chain).
    pub accepted_at: u64,
}

/// What one exchange did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The offer was signed and the gateway stored it.
    Acknowledged(Verified),
    /// The offer did not hold and was not signed.
    Refused(String),
}

/// Slack on the lease's clock: ticks close on the gateway's clock, the check runs on ours.
const CLOCK_SLACK_SECS: u64 = 120;

impl Exchange {
    fn verified_path(&self) -> PathBuf {
        self.counts.with_extension("verified.json")
    }

    /// One round: fetch the ticks since the last verified one and the offer, judge, answer.
    /// Blocking; run it off the relay's threads.
    pub fn run(&self) -> anyhow::Result<Outcome> {
        use std::io::{BufReader, Write};
        use std::process::{Command, Stdio};
        let from = Verified::load(&self.verified_path())?;
        let proxy = format!(
            "ProxyCommand=\"{}\" tunnel --counts \"{}\" %h %p",
            self.exe.display(),
            self.counts.display()
        );
        let mut child = Command::new("ssh")
            .arg("-F")
            .arg(&self.ssh_config)
            .args(["-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", &proxy])
            .args(["-s", &self.alias, "shale-ack"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running ssh for the acknowledgment")?;
        let mut to_gateway = child.stdin.take().expect("piped");
        let mut from_gateway = BufReader::new(child.stdout.take().expect("piped"));
        let request = shale_meter::ack::AckRequest {
            after_seq: from.seq,
        };
        writeln!(to_gateway, "{}", serde_json::to_string(&request)?)?;
        to_gateway.flush()?;
        let mut ticks = Vec::new();
        let offer = loop {
            let line = read_line(&mut from_gateway)?;
            match serde_json::from_str::<shale_meter::ack::AckLine>(&line)
                .with_context(|| format!("the gateway sent {line:?}"))?
            {
                shale_meter::ack::AckLine::Tick(t) => {
                    if ticks.len() >= 1_000_000 {
                        anyhow::bail!("the gateway sent more than a million ticks");
                    }
                    ticks.push(t)
                }
                shale_meter::ack::AckLine::Offer(o) => break o,
                shale_meter::ack::AckLine::Error { reason } => {
                    anyhow::bail!("the gateway: {reason}")
                }
                shale_meter::ack::AckLine::Stored => anyhow::bail!("the gateway skipped its offer"),
            }
        };
        let wire = crate::wire::WireCounts::at(&self.counts).read()?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let expected = Expected {
            max_seconds: now.saturating_sub(self.accepted_at) + CLOCK_SLACK_SECS,
            ..self.expected.clone()
        };
        let answer;
        let outcome = match judge(&expected, &from, &ticks, &offer, wire) {
            Ok((ack, verified)) => {
                let key = AckKey::at(&self.key).load()?;
                let sig = ack.sign(&key, expected.chain_id, expected.marketplace)?;
                answer = shale_meter::ack::AckAnswer::Signed {
                    signature: format!("0x{}", hex(&sig)),
                };
                Outcome::Acknowledged(verified)
            }
            Err(reason) => {
                answer = shale_meter::ack::AckAnswer::Refused {
                    reason: reason.clone(),
                };
                Outcome::Refused(reason)
            }
        };
        writeln!(to_gateway, "{}", serde_json::to_string(&answer)?)?;
        to_gateway.flush()?;
        drop(to_gateway);
        if let Outcome::Acknowledged(verified) = &outcome {
            let line = read_line(&mut from_gateway)?;
            match serde_json::from_str::<shale_meter::ack::AckLine>(&line) {
                Ok(shale_meter::ack::AckLine::Stored) => verified.store(&self.verified_path())?,
                Ok(shale_meter::ack::AckLine::Error { reason }) => {
                    anyhow::bail!("the gateway did not take the acknowledgment: {reason}")
                }
                _ => anyhow::bail!("the gateway answered {line:?}"),
            }
        }
        child.wait().ok();
        Ok(outcome)
    }
}

/// One line of at most [`shale_meter::ack::MAX_LINE`] bytes, without its newline.
fn read_line<R: std::io::BufRead>(r: &mut R) -> anyhow::Result<String> {
    use std::io::{BufRead, Read};
    let mut buf = Vec::new();
    let limit = shale_meter::ack::MAX_LINE as u64 + 1;
    r.by_ref().take(limit).read_until(b'\n', &mut buf)?;
    if buf.is_empty() {
        anyhow::bail!("the gateway closed the acknowledgment channel");
    }
    if buf.last() != Some(&b'\n') {
        anyhow::bail!("a line from the gateway is too long or cut off");
    }
    buf.pop();
    String::from_utf8(buf).context("a line from the gateway is not UTF-8")
}
