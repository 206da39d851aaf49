//! Where the chain is and who signs: flags, then environment, then a config file.
//!
//! The config file is `--config`/`SHALE_CONFIG`, else `~/.config/shale/config.toml`, else the
//! local stack's `.state/dev/client.toml` (written by `shale dev up`) found from the working
//! directory upwards, else the `client.toml` of the local stack's own folder
//! ([`crate::cmd::dev::state_dir`]), so that right after `shale dev up` every command talks to the
//! dev chain.
//!
//! Signing keys never come from the command line (it ends up in shell history and `ps`): a
//! keystore file (`--keystore`/`SHALE_KEYSTORE`/`keystore =` in the config; password from
//! `SHALE_KEYSTORE_PASSWORD` or a prompt), or, for development, a raw hex key in
//! `SHALE_PRIVATE_KEY`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use serde::{Deserialize, Serialize};
use shale_contracts::{
    Address, AddressError, AnyAddress, FeePolicy, Marketplace, PrivateKeySigner,
};

/// Chain and key options shared by every command that talks to the marketplace.
#[derive(Debug, Clone, Args)]
pub struct ChainArgs {
    /// Ethereum JSON-RPC endpoint of the chain (anvil, a Filecoin FEVM node).
    #[arg(long, env = "SHALE_RPC_URL", global = true)]
    pub rpc_url: Option<String>,
    /// Address of the Marketplace contract (0x…, f410f… or t410f…).
    #[arg(long, env = "SHALE_MARKETPLACE", global = true, value_parser = address_arg)]
    pub marketplace: Option<Address>,
    /// Client config file (TOML: rpc_url, marketplace, keystore, ssh_dir).
    #[arg(long = "client-config", env = "SHALE_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Keystore file (geth/EIP-2335 JSON) holding the signing key; its password comes from
    /// SHALE_KEYSTORE_PASSWORD or a prompt.
    #[arg(long, env = "SHALE_KEYSTORE", global = true)]
    pub keystore: Option<PathBuf>,
    /// Where `order create` writes the SSH `Host` entries and pinned host keys
    /// (`<dir>/shale/config`, `<dir>/shale/known_hosts`).
    #[arg(long, env = "SHALE_SSH_DIR", global = true)]
    pub ssh_dir: Option<PathBuf>,
}

/// The client config file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// JSON-RPC endpoint.
    pub rpc_url: Option<String>,
    /// Marketplace contract, in any of its spellings (0x…, f410f…, t410f…).
    pub marketplace: Option<AnyAddress>,
    /// Keystore file of the signing key.
    pub keystore: Option<PathBuf>,
    /// Where SSH entries are written (default `~/.ssh`).
    pub ssh_dir: Option<PathBuf>,
    /// Gas and fee headroom on the client's transactions (`[fees]`).
    #[serde(default)]
    pub fees: FeePolicy,
}

impl ClientConfig {
    /// Reads a config file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the config file {}", path.display()))?;
        toml::from_str(&text)
            .with_context(|| format!("the config file {} is invalid", path.display()))
    }
}

/// The resolved settings of one invocation.
#[derive(Debug, Clone)]
pub struct Settings {
    pub rpc_url: String,
    pub marketplace: Address,
    pub keystore: Option<PathBuf>,
    pub ssh_dir: PathBuf,
    pub fees: FeePolicy,
}

/// Parses an address argument in any of its spellings; clap shows the error, which names the
/// rule that failed (EIP-55 case, Filecoin checksum, network letter, …).
pub fn address_arg(text: &str) -> Result<Address, AddressError> {
    text.parse::<AnyAddress>().map(Address::from)
}

/// The user's home directory.
pub fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

/// The dev stack's client config, from the working directory upwards, else in the folder
/// `shale dev up` uses from here.
fn dev_client_config() -> Option<PathBuf> {
    let cwd = std::env::current_dir().ok()?;
    cwd.ancestors()
        .map(|d| d.join(".state/dev/client.toml"))
        .chain([crate::cmd::dev::state_dir().join("client.toml")])
        .find(|p| p.is_file())
}

impl ChainArgs {
    /// Merges flags, environment (clap has read both) and the config file.
    pub fn resolve(&self) -> anyhow::Result<Settings> {
        let path = self.config.clone().or_else(|| {
            let user = home().join(".config/shale/config.toml");
            if user.is_file() {
                Some(user)
            } else {
                dev_client_config()
            }
        });
        let file = match &path {
            Some(p) => ClientConfig::load(p)?,
            None => ClientConfig::default(),
        };
        let Some(rpc_url) = self.rpc_url.clone().or(file.rpc_url) else {
            bail!(
                "no chain RPC endpoint: pass --rpc-url, set SHALE_RPC_URL, put rpc_url in \
                 ~/.config/shale/config.toml, or start the local stack with `shale dev up`"
            );
        };
        let Some(marketplace) = self.marketplace.or(file.marketplace.map(Address::from)) else {
            bail!(
                "no marketplace contract: pass --marketplace, set SHALE_MARKETPLACE, or put \
                 marketplace in ~/.config/shale/config.toml"
            );
        };
        Ok(Settings {
            rpc_url,
            marketplace,
            keystore: self.keystore.clone().or(file.keystore),
            ssh_dir: self
                .ssh_dir
                .clone()
                .or(file.ssh_dir)
                .unwrap_or_else(|| home().join(".ssh")),
            fees: file.fees,
        })
    }
}

impl Settings {
    /// A read-only marketplace client.
    pub async fn reader(&self) -> anyhow::Result<Marketplace> {
        Marketplace::connect(&self.rpc_url, self.marketplace, None)
            .await
            .with_context(|| format!("connecting to the marketplace on {}", self.rpc_url))
    }

    /// A marketplace client that signs with the configured key.
    pub async fn signer(&self) -> anyhow::Result<Marketplace> {
        let key = load_signer(self.keystore.as_deref())?;
        Marketplace::connect_with_fees(&self.rpc_url, self.marketplace, Some(key), self.fees)
            .await
            .with_context(|| format!("connecting to the marketplace on {}", self.rpc_url))
    }
}

/// Decrypts a keystore file with `password`.
pub fn open_keystore(path: &Path, password: &str) -> anyhow::Result<PrivateKeySigner> {
    PrivateKeySigner::decrypt_keystore(path, password).with_context(|| {
        format!(
            "cannot open the keystore {} (wrong password, or not a keystore file)",
            path.display()
        )
    })
}

/// The signing key: a keystore file when one is configured, else `SHALE_PRIVATE_KEY`.
pub fn load_signer(keystore: Option<&Path>) -> anyhow::Result<PrivateKeySigner> {
    if let Some(path) = keystore {
        let password = match std::env::var("SHALE_KEYSTORE_PASSWORD") {
            Ok(p) => p,
            Err(_) => rpassword::prompt_password(format!("Password for {}: ", path.display()))
                .context("reading the keystore password from the terminal")?,
        };
        return open_keystore(path, &password);
    }
    match std::env::var("SHALE_PRIVATE_KEY") {
        Ok(hex) => hex.trim().parse::<PrivateKeySigner>().map_err(|_| {
            anyhow::anyhow!("SHALE_PRIVATE_KEY is not a private key (expected 64 hex digits)")
        }),
        Err(_) => bail!(
            "this command signs a transaction and needs a key: pass --keystore FILE (or set \
             SHALE_KEYSTORE), or for development set SHALE_PRIVATE_KEY to a hex private key"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_keystore_opens_with_its_password_and_says_so_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let secret = [7u8; 32];
        let (made, _uuid) = PrivateKeySigner::encrypt_keystore(
            dir.path(),
            &mut rand::thread_rng(),
            secret,
            "correct horse",
            Some("sp.json"),
        )
        .unwrap();
        let path = dir.path().join("sp.json");
        let opened = open_keystore(&path, "correct horse").unwrap();
        assert_eq!(opened.address(), made.address());
        let err = open_keystore(&path, "wrong").unwrap_err().to_string();
        assert!(err.contains("wrong password"), "{err}");
        let err = open_keystore(&dir.path().join("missing.json"), "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot open the keystore"), "{err}");
    }

    #[test]
    fn the_marketplace_flag_takes_every_spelling_and_says_which_rule_failed() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            chain: ChainArgs,
        }
        let hex = "0x5fbdb2315678afecb367f032d93f642f64180aa3";
        for text in [
            hex,
            "0x5FbDB2315678afecb367f032d93F642f64180aa3",
            "t410fl663emkwpcx6zm3h6aznsp3ef5sbqcvdf5mfrna",
            "f410fl663emkwpcx6zm3h6aznsp3ef5sbqcvdf5mfrna",
        ] {
            let cli = Cli::try_parse_from(["shale", "--marketplace", text]).unwrap();
            assert_eq!(
                format!("{:#x}", cli.chain.marketplace.unwrap()),
                hex,
                "{text}"
            );
        }
        for (text, rule) in [
            ("0x5FbDB2315678afecb367f032d93F642f64180aA3", "EIP-55"),
            ("t410fl663emkwpcx6zm3h6aznsp3ef5sbqcvdf5mfrnb", "checksum"),
            ("t1abjxfbp274xpdqcpuaykwkfb43omjotacm2p3za", "protocol-1"),
        ] {
            let err = Cli::try_parse_from(["shale", "--marketplace", text])
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains(rule), "{text}: {err}");
        }
    }

    #[test]
    fn flags_win_over_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "rpc_url = \"http://file:8545\"\nmarketplace = \"0x5fbdb2315678afecb367f032d93f642f64180aa3\"\n",
        )
        .unwrap();
        let args = ChainArgs {
            rpc_url: Some("http://flag:8545".into()),
            marketplace: None,
            config: Some(file.clone()),
            keystore: None,
            ssh_dir: Some(dir.path().into()),
        };
        let s = args.resolve().unwrap();
        assert_eq!(s.rpc_url, "http://flag:8545");
        assert_eq!(
            format!("{:#x}", s.marketplace),
            "0x5fbdb2315678afecb367f032d93f642f64180aa3"
        );
        // The same contract in its Filecoin spelling.
        std::fs::write(
            &file,
            "rpc_url = \"x\"\nmarketplace = \"t410fl663emkwpcx6zm3h6aznsp3ef5sbqcvdf5mfrna\"\n",
        )
        .unwrap();
        assert_eq!(
            format!("{:#x}", args.resolve().unwrap().marketplace),
            "0x5fbdb2315678afecb367f032d93f642f64180aa3"
        );
        std::fs::write(&file, "rpc_url = \"x\"\nbogus = 1\n").unwrap();
        let err = format!("{:#}", args.resolve().unwrap_err());
        assert!(err.contains("is invalid"), "{err}");
    }
}
