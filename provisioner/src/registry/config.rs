//! What the provider's config says about each registry: where it is, how to authenticate,
//! whether it speaks plain HTTP.

use std::fmt;

use serde::Deserialize;

/// How the provisioner authenticates to one registry.
///
/// In TOML: `auth = { type = "basic", username = "u", password = "p" }`,
/// `auth = { type = "bearer", token = "t" }` or nothing (anonymous).
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RegistryAuth {
    /// No credentials; the registry's anonymous token flow is still followed.
    #[default]
    Anonymous,
    /// HTTP basic credentials, also used to ask the registry's token service for a token.
    Basic { username: String, password: String },
    /// A token sent as `Authorization: Bearer` as it is.
    Bearer { token: String },
}

impl fmt::Debug for RegistryAuth {
    /// Never prints a secret: configs end up in logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegistryAuth::Anonymous => f.write_str("Anonymous"),
            RegistryAuth::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
            RegistryAuth::Bearer { .. } => f
                .debug_struct("Bearer")
                .field("token", &"<redacted>")
                .finish(),
        }
    }
}

/// One registry the provider pulls from; the gateway's config embeds a list of these.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// The registry as references name it: `host` or `host:port` (`registry.example:5000`).
    pub host: String,
    /// The credentials for this registry.
    #[serde(default)]
    pub auth: RegistryAuth,
    /// Speak plain HTTP to this registry. Only for a registry on loopback or a network the
    /// provider trusts: nothing then protects the credentials or the manifests in transit.
    #[serde(default)]
    pub insecure_http: bool,
}

impl RegistryConfig {
    /// An anonymous HTTPS registry: what a reference's registry gets when no config names it.
    pub fn anonymous(host: impl Into<String>) -> Self {
        RegistryConfig {
            host: host.into(),
            auth: RegistryAuth::Anonymous,
            insecure_http: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_reads_from_toml_and_never_prints_secrets() {
        let c: RegistryConfig = toml::from_str(
            "host = \"r.example:5000\"\ninsecure_http = true\n\
             auth = { type = \"basic\", username = \"sp\", password = \"hunter2\" }",
        )
        .unwrap();
        assert_eq!(c.host, "r.example:5000");
        assert!(c.insecure_http);
        assert!(!format!("{c:?}").contains("hunter2"));
        let c: RegistryConfig =
            toml::from_str("host = \"r\"\nauth = { type = \"bearer\", token = \"t0k\" }").unwrap();
        assert_eq!(
            c.auth,
            RegistryAuth::Bearer {
                token: "t0k".into()
            }
        );
        assert!(!format!("{c:?}").contains("t0k"));
        let c: RegistryConfig = toml::from_str("host = \"r\"").unwrap();
        assert_eq!(c, RegistryConfig::anonymous("r"));
    }
}
