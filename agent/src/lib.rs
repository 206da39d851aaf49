//! The wire between the privileged side of the gateway and the agent inside an order's container.
//!
//! The agent runs in the container (started there by containerd, with the container's user,
//! capabilities, seccomp filter and cgroup) and connects back to a socket the broker listens on
//! for that one start. The broker sends [`Command`]s; a `Spawn` carries the new process's stdio
//! as descriptors the broker made: the process's ends of three pipes, or the slave of a
//! terminal the broker opened in the container's own `devpts`. The agent forks, puts them on
//! 0, 1 and 2, and execs. Its [`Report`]s carry no descriptors.
//!
//! So the gateway's ends of a process's stdio never leave the host: whatever runs in the
//! container (the agent, or a tenant's program in its place) sees only the ends a process would
//! have anyway, and every report it sends is parsed as hostile, under [`MAX_REPORT`].
//!
//! A frame is a 4-byte big-endian length and a JSON document; the descriptors of a `Spawn`
//! follow its frame on a one-byte message of their own (`SCM_RIGHTS`).

use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// This build's protocol version, sent in [`Report::Hello`].
pub const VERSION: u32 = 1;

/// The largest command the agent accepts: a spawn's argv and environment.
pub const MAX_COMMAND: usize = 256 * 1024;

/// The largest report the broker accepts from an agent; reports are a few dozen bytes.
pub const MAX_REPORT: usize = 4096;

/// Longest failure reason an agent sends; longer ones are cut.
pub const MAX_REASON: usize = 1024;

/// Where the agent's binary is bound inside every container that has one.
pub const CONTAINER_BINARY: &str = "/run/shale/agent";

/// The directory, bound read-only inside the container, where the broker listens.
pub const CONTAINER_LINK_DIR: &str = "/run/shale/link";

/// The socket's name in [`CONTAINER_LINK_DIR`].
pub const LINK_SOCKET: &str = "agent.sock";

/// What the broker asks of the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Start a process. Its descriptors follow the frame: one (a terminal's slave) when `tty`,
    /// else three (the read end of stdin's pipe, the write ends of stdout's and stderr's).
    Spawn {
        /// The broker's id for the process, echoed in every report about it.
        id: u64,
        /// Program and arguments; a program without a `/` is looked up in `env`'s `PATH`.
        argv: Vec<String>,
        /// The whole environment, `NAME=value`.
        env: Vec<String>,
        /// Working directory.
        cwd: String,
        /// Whether the descriptor is a terminal to make the controlling one.
        tty: bool,
    },
    /// Deliver a signal to a process the agent started.
    Signal { id: u64, signal: i32 },
}

impl Command {
    /// How many descriptors follow this command's frame.
    pub fn descriptors(&self) -> usize {
        match self {
            Command::Spawn { tty: true, .. } => 1,
            Command::Spawn { tty: false, .. } => 3,
            Command::Signal { .. } => 0,
        }
    }
}

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// It exited with this code.
    Code(i32),
    /// This signal killed it.
    Signal(i32),
}

/// What the agent tells the broker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Report {
    /// First on every connection.
    Hello { version: u32 },
    /// The process runs (its program was executed) as `pid` in the container's namespace.
    Spawned { id: u64, pid: i32 },
    /// The process could not be started.
    Failed { id: u64, reason: String },
    /// The process ended.
    Exited { id: u64, status: Status },
}

/// A frame that cannot be read.
#[derive(Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Its length is over the cap.
    TooLarge { len: usize, max: usize },
    /// Its body is not the expected JSON.
    Malformed(String),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::TooLarge { len, max } => {
                write!(f, "a {len}-byte frame is over the {max}-byte cap")
            }
            FrameError::Malformed(e) => write!(f, "a malformed frame: {e}"),
        }
    }
}

impl std::error::Error for FrameError {}

/// One value as a frame: its length and its JSON.
pub fn encode<T: Serialize>(value: &T, max: usize) -> Result<Vec<u8>, FrameError> {
    let body = serde_json::to_vec(value).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if body.len() > max {
        return Err(FrameError::TooLarge {
            len: body.len(),
            max,
        });
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Takes the first whole frame off `buf`: `None` while it is incomplete. A length over `max`
/// is an error as soon as the length is there, before any of its body is buffered.
pub fn decode<T: DeserializeOwned>(buf: &mut Vec<u8>, max: usize) -> Result<Option<T>, FrameError> {
    let Some(len) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(len.try_into().expect("four bytes")) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    let value =
        serde_json::from_slice(&buf[4..4 + len]).map_err(|e| FrameError::Malformed(e.to_string()));
    buf.drain(..4 + len);
    value.map(Some)
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_whole_or_split() {
        let cmd = Command::Spawn {
            id: 7,
            argv: vec!["/bin/sh".into(), "-c".into(), "true".into()],
            env: vec!["PATH=/bin".into()],
            cwd: "/work".into(),
            tty: false,
        };
        let frame = encode(&cmd, MAX_COMMAND).unwrap();
        let mut buf = Vec::new();
        for (i, b) in frame.iter().enumerate() {
            assert_eq!(
                decode::<Command>(&mut buf, MAX_COMMAND).unwrap(),
                None,
                "at {i}"
            );
            buf.push(*b);
        }
        assert_eq!(decode::<Command>(&mut buf, MAX_COMMAND).unwrap(), Some(cmd));
        assert!(buf.is_empty());
    }

    #[test]
    fn an_oversized_length_is_refused_before_its_body() {
        let mut buf = (MAX_REPORT as u32 + 1).to_be_bytes().to_vec();
        assert_eq!(
            decode::<Report>(&mut buf, MAX_REPORT),
            Err(FrameError::TooLarge {
                len: MAX_REPORT + 1,
                max: MAX_REPORT
            })
        );
    }

    #[test]
    fn garbage_is_malformed_and_consumed() {
        let mut buf = 3u32.to_be_bytes().to_vec();
        buf.extend_from_slice(b"{x}");
        assert!(matches!(
            decode::<Report>(&mut buf, MAX_REPORT),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
