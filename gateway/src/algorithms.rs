//! The SSH algorithms the gateway offers: OpenSSH 9.x sshd's defaults, in its order, wherever
//! russh implements them, so that any client that reaches a stock sshd reaches the gateway with
//! the same choices (`ssh -c aes128-gcm@openssh.com`, `-o KexAlgorithms=ecdh-sha2-nistp256`).
//! The README lists them; a test here keeps the two in step.
//!
//! Left out because russh 0.65 lacks them: `sntrup761x25519-sha512` (OpenSSH 9.2 falls back to
//! `curve25519-sha256`), the `umac-*` MACs. Left out on purpose: the finite-field groups sshd
//! does not offer by default (group15, group17), and `zlib` before authentication (only
//! `zlib@openssh.com`, which starts after login, as sshd does).

use std::borrow::Cow;

use russh::keys::{Algorithm, EcdsaCurve, HashAlg};
use russh::{cipher, compression, kex, mac, Preferred};

/// Key exchange, most preferred first (the extension pseudo-algorithms last).
const KEX: &[kex::Name] = &[
    kex::MLKEM768X25519_SHA256,
    kex::CURVE25519,
    kex::CURVE25519_PRE_RFC_8731,
    kex::ECDH_SHA2_NISTP256,
    kex::ECDH_SHA2_NISTP384,
    kex::ECDH_SHA2_NISTP521,
    kex::DH_GEX_SHA256,
    kex::DH_G16_SHA512,
    kex::DH_G18_SHA512,
    kex::DH_G14_SHA256,
    // As russh's own default lists them; it announces the ones of its role.
    kex::EXTENSION_SUPPORT_AS_CLIENT,
    kex::EXTENSION_SUPPORT_AS_SERVER,
    kex::EXTENSION_OPENSSH_STRICT_KEX_AS_CLIENT,
    kex::EXTENSION_OPENSSH_STRICT_KEX_AS_SERVER,
];

/// Ciphers, in sshd's order.
const CIPHERS: &[cipher::Name] = &[
    cipher::CHACHA20_POLY1305,
    cipher::AES_128_CTR,
    cipher::AES_192_CTR,
    cipher::AES_256_CTR,
    cipher::AES_128_GCM,
    cipher::AES_256_GCM,
];

/// MACs (unused with the AEAD ciphers above), in sshd's order: HMAC-SHA1 is still sshd's default
/// and is not broken as a MAC; it comes after every SHA-2 choice.
const MACS: &[mac::Name] = &[
    mac::HMAC_SHA256_ETM,
    mac::HMAC_SHA512_ETM,
    mac::HMAC_SHA1_ETM,
    mac::HMAC_SHA256,
    mac::HMAC_SHA512,
    mac::HMAC_SHA1,
];

/// Host and client key algorithms: as sshd since 8.8, RSA only with SHA-2 signatures.
const KEYS: &[Algorithm] = &[
    Algorithm::Ed25519,
    Algorithm::Ecdsa {
        curve: EcdsaCurve::NistP256,
    },
    Algorithm::Ecdsa {
        curve: EcdsaCurve::NistP384,
    },
    Algorithm::Ecdsa {
        curve: EcdsaCurve::NistP521,
    },
    Algorithm::Rsa {
        hash: Some(HashAlg::Sha512),
    },
    Algorithm::Rsa {
        hash: Some(HashAlg::Sha256),
    },
];

/// Compression: none, or zlib once logged in.
const COMPRESSION: &[compression::Name] = &[compression::NONE, compression::ZLIB_LEGACY];

/// What the gateway offers.
pub fn offered() -> Preferred {
    Preferred {
        kex: Cow::Borrowed(KEX),
        cipher: Cow::Borrowed(CIPHERS),
        mac: Cow::Borrowed(MACS),
        compression: Cow::Borrowed(COMPRESSION),
        key: Cow::Borrowed(KEYS),
        ..Preferred::default()
    }
}

/// The offered names of each kind, for the README and logs.
pub fn names() -> Vec<(&'static str, Vec<&'static str>)> {
    let kex = KEX
        .iter()
        .map(AsRef::<str>::as_ref)
        .filter(|n| !n.starts_with("ext-info") && !n.starts_with("kex-strict"))
        .collect();
    vec![
        ("kex", kex),
        (
            "ciphers",
            CIPHERS.iter().map(AsRef::<str>::as_ref).collect(),
        ),
        ("macs", MACS.iter().map(AsRef::<str>::as_ref).collect()),
        (
            "compression",
            COMPRESSION.iter().map(AsRef::<str>::as_ref).collect(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readme_lists_what_is_offered() {
        let readme = include_str!("../../README.md");
        for (kind, names) in names() {
            for name in names {
                assert!(
                    readme.contains(&format!("`{name}`")),
                    "README.md does not list the {kind} algorithm `{name}`"
                );
            }
        }
    }

    #[test]
    fn opensshs_defaults_that_were_missing_are_offered() {
        let all: Vec<&str> = names().into_iter().flat_map(|(_, n)| n).collect();
        for name in [
            "aes128-gcm@openssh.com",
            "ecdh-sha2-nistp256",
            "ecdh-sha2-nistp384",
            "ecdh-sha2-nistp521",
            "curve25519-sha256",
            "chacha20-poly1305@openssh.com",
        ] {
            assert!(all.contains(&name), "{name}");
        }
        assert!(!all.contains(&"zlib"), "no compression before login");
    }
}
