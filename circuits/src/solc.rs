//! Compiles a generated verifier (or any single-file contract) to deployable creation bytecode with
//! the project's pinned solc-js.
//!
//! The marketplace is compiled with solc-js from `.tools/node_modules/solc` (installed by
//! `scripts/setup.sh`, pinned in `tools/package.json`), for `paris` with the optimizer at 200 runs.
//! Verifiers must be compiled with exactly the same compiler and settings so that their gas and
//! behaviour match what the contracts' forge tests measured; this module is the one place that
//! does it, for the setup command, the tests and the local stack.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let (_, vk) = shale_circuits::setup_from_seed(16, 1)?;
//! let code: Vec<u8> = shale_circuits::solc::compile_verifier(&vk)?;
//! # let _ = code; Ok(()) }
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::keys::VerifyingKey;
use crate::solidity::contract_name;

/// The EVM version every Shale contract is compiled for (Filecoin's FEVM supports it).
pub const EVM_VERSION: &str = "paris";
/// Optimizer runs of every Shale contract.
pub const OPTIMIZER_RUNS: u32 = 200;

/// Why a contract could not be compiled.
#[derive(Debug, thiserror::Error)]
pub enum SolcError {
    /// `node` is not on `PATH` (and `SHALE_NODE` does not name it).
    #[error("node (Node.js) was not found on PATH; it runs solc-js: install it with scripts/setup.sh or set SHALE_NODE")]
    NodeNotFound,
    /// solc-js is not installed where it was looked for.
    #[error("solc-js was not found (looked for {looked_for}); run scripts/setup.sh to install it into .tools/, or set SHALE_SOLC_JS to its solc.js")]
    SolcJsNotFound {
        /// Where it was looked for.
        looked_for: String,
    },
    /// Starting node or talking to it failed.
    #[error("running {node} {solc_js}: {source}")]
    Spawn {
        /// The node binary.
        node: PathBuf,
        /// The solc.js script.
        solc_js: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// solc-js exited with an error status.
    #[error("solc-js failed ({status}): {stderr}")]
    Failed {
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// solc-js printed something that is not its standard-JSON output.
    #[error("solc-js printed output that is not standard JSON: {0}")]
    Output(String),
    /// The compiler reported errors (or warnings, which the project treats as errors).
    #[error("solc reported problems compiling {name}:\n{}", problems.join("\n"))]
    Compile {
        /// The contract.
        name: String,
        /// The formatted messages.
        problems: Vec<String>,
    },
    /// The output has no bytecode for the contract asked for.
    #[error("solc's output has no bytecode for contract {0}")]
    MissingContract(String),
}

/// A located solc-js: the `node` binary and the `solc.js` script it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SolcJs {
    node: PathBuf,
    solc_js: PathBuf,
}

impl SolcJs {
    /// Uses these exact paths.
    pub fn new(node: impl Into<PathBuf>, solc_js: impl Into<PathBuf>) -> Self {
        SolcJs {
            node: node.into(),
            solc_js: solc_js.into(),
        }
    }

    /// Finds node (`SHALE_NODE`, else `PATH`) and solc-js (`SHALE_SOLC_JS`, else
    /// `.tools/node_modules/solc/solc.js` in the running binary's folder or one above it (a
    /// checkout's `target/…/shale`, or `PREFIX/bin/shale` beside `PREFIX/.tools`), else in the
    /// working directory or one above it). Never through the folder this crate was built in: a
    /// binary runs after its checkout is gone.
    pub fn find() -> Result<Self, SolcError> {
        let node = match std::env::var_os("SHALE_NODE") {
            Some(path) => PathBuf::from(path),
            None => on_path("node").ok_or(SolcError::NodeNotFound)?,
        };
        if let Some(path) = std::env::var_os("SHALE_SOLC_JS") {
            let path = PathBuf::from(path);
            if !path.is_file() {
                return Err(SolcError::SolcJsNotFound {
                    looked_for: path.display().to_string(),
                });
            }
            return Ok(SolcJs::new(node, path));
        }
        let relative = Path::new(".tools/node_modules/solc/solc.js");
        let mut starts = Vec::new();
        if let Some(dir) = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(Path::to_path_buf))
        {
            starts.push(dir);
        }
        if let Ok(cwd) = std::env::current_dir() {
            starts.push(cwd);
        }
        for start in &starts {
            for dir in start.ancestors() {
                let candidate = dir.join(relative);
                if candidate.is_file() {
                    return Ok(SolcJs::new(node, candidate));
                }
            }
        }
        Err(SolcError::SolcJsNotFound {
            looked_for: format!(
                "{} in {} and their parents",
                relative.display(),
                starts
                    .iter()
                    .map(|s| s.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" and ")
            ),
        })
    }

    /// The solc.js script.
    pub fn script(&self) -> &Path {
        &self.solc_js
    }

    /// Compiles `source` (one file, no imports) and returns the creation bytecode of contract
    /// `name`, with the marketplace's settings ([`EVM_VERSION`], optimizer [`OPTIMIZER_RUNS`]).
    ///
    /// Blocks while node runs (a second or two): call it from `spawn_blocking` in async code.
    pub fn compile(&self, name: &str, source: &str) -> Result<Vec<u8>, SolcError> {
        let _span = tracing::debug_span!("solc_compile", contract = name).entered();
        let file = format!("{name}.sol");
        let input = serde_json::json!({
            "language": "Solidity",
            "sources": { &file: { "content": source } },
            "settings": {
                "optimizer": { "enabled": true, "runs": OPTIMIZER_RUNS },
                "evmVersion": EVM_VERSION,
                "outputSelection": { "*": { "*": ["evm.bytecode.object"] } }
            }
        });
        let spawn_err = |source| SolcError::Spawn {
            node: self.node.clone(),
            solc_js: self.solc_js.clone(),
            source,
        };
        let mut child = Command::new(&self.node)
            .arg(&self.solc_js)
            .arg("--standard-json")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_err)?;
        // The input is small (tens of kB) and solc-js reads all of stdin before writing, so
        // writing it whole before reading the output cannot deadlock.
        child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(input.to_string().as_bytes())
            .map_err(spawn_err)?;
        let out = child.wait_with_output().map_err(spawn_err)?;
        if !out.status.success() {
            return Err(SolcError::Failed {
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        // solc-js prints diagnostics starting with ">>>" on stdout, around the JSON.
        let json: String = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with(">>>"))
            .collect();
        let output: serde_json::Value =
            serde_json::from_str(&json).map_err(|e| SolcError::Output(e.to_string()))?;
        let problems: Vec<String> = output["errors"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                e["formattedMessage"]
                    .as_str()
                    .or(e["message"].as_str())
                    .unwrap_or("unknown problem")
                    .trim()
                    .to_owned()
            })
            .collect();
        if !problems.is_empty() {
            return Err(SolcError::Compile {
                name: name.to_owned(),
                problems,
            });
        }
        let object = output["contracts"][&file][name]["evm"]["bytecode"]["object"]
            .as_str()
            .filter(|o| !o.is_empty())
            .ok_or_else(|| SolcError::MissingContract(name.to_owned()))?;
        hex::decode(object.trim_start_matches("0x"))
            .map_err(|e| SolcError::Output(format!("bytecode is not hex: {e}")))
    }

    /// Compiles the Solidity verifier generated for `vk` (contract [`contract_name`]).
    pub fn compile_verifier(&self, vk: &VerifyingKey) -> Result<Vec<u8>, SolcError> {
        self.compile(&contract_name(vk.capacity()), &vk.solidity())
    }
}

/// Finds solc-js with [`SolcJs::find`] and compiles the verifier generated for `vk`.
pub fn compile_verifier(vk: &VerifyingKey) -> Result<Vec<u8>, SolcError> {
    SolcJs::find()?.compile_verifier(vk)
}

fn on_path(binary: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|dir| dir.join(binary))
        .find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_solc_js_is_a_typed_error_naming_the_fix() {
        let solc = SolcJs::new("node", "/nonexistent/solc.js");
        // node exists on CI machines but the script does not: node fails, reported as Failed;
        // without node at all, it is a Spawn error. Either way nothing panics.
        let err = solc.compile("X", "contract X {}").unwrap_err();
        assert!(matches!(
            err,
            SolcError::Failed { .. } | SolcError::Spawn { .. }
        ));
        let missing = SolcError::SolcJsNotFound {
            looked_for: "here".into(),
        };
        assert!(missing.to_string().contains("scripts/setup.sh"));
    }

    #[test]
    fn compiles_a_contract_and_reports_errors() {
        let Ok(solc) = SolcJs::find() else {
            eprintln!("SKIPPED: solc-js not installed; run scripts/setup.sh");
            // In CI a missing component is a failure, never a skipped pass.
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true: the reason above fails the test"
            );
            return;
        };
        let code = solc
            .compile(
                "Answer",
                "// SPDX-License-Identifier: Apache-2.0\npragma solidity ^0.8.24;\ncontract Answer { function get() external pure returns (uint256) { return 42; } }",
            )
            .unwrap();
        assert!(!code.is_empty());
        let err = solc
            .compile(
                "Broken",
                "// SPDX-License-Identifier: Apache-2.0\npragma solidity ^0.8.24;\ncontract Broken { function f( }",
            )
            .unwrap_err();
        assert!(matches!(err, SolcError::Compile { .. }), "{err}");
    }
}
