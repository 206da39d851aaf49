//! The gateway's config file: TOML into `GatewayConfig`, as `GatewayConfig::load` reads it.
//! (The CLI's `SpConfig` lives in the `shale` binary, which no library exposes.)
//!
//! Invariants: no input panics; an accepted `max_startups` satisfies what its parser promises
//! (0 < full, start <= full, rate <= 100); a config's printed form shows the RPC URL only as
//! `scheme://host[:port]`, never a user, password, path or query that may carry an API key.

use shale_contracts::Marketplace;
use shale_gateway::GatewayConfig;

/// Runs the target on one input; panics where an invariant breaks.
pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = toml::from_str::<GatewayConfig>(text) else {
        return;
    };
    let startups = config.sessions.max_startups;
    assert!(startups.full > 0 && startups.start <= startups.full && startups.rate <= 100);

    let shown = Marketplace::redact_url(&config.chain.rpc_url);
    let after_scheme = shown.split_once("://").map_or("", |(_, rest)| rest);
    assert!(
        !after_scheme.contains(['@', '/', '?', '#']),
        "{:?} shown as {shown:?}",
        config.chain.rpc_url
    );
    let printed = format!("{:?}", config.chain);
    assert!(printed.contains(&format!("{shown:?}")), "{printed}");
}
