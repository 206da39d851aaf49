#!/usr/bin/env bash
# Compiles the Solidity sources with the pinned solc-js into the committed JSON artifacts under
# contracts/artifacts/ (ABI + bytecode, foundry's artifact shape) that the Rust bindings
# (`alloy::sol!` in contracts/src/bindings.rs) are generated from. Run it after any change to
# contracts/src/*.sol; `cargo test -p shale-contracts` fails while the artifacts are stale
# (contracts/artifacts/SOURCES.sha256 records what they were built from).
#
# Compiler settings match contracts/foundry.toml: optimizer on, 10 runs (runtime size: Marketplace is near EIP-170's 24,576 bytes), EVM "paris".
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
solc_dir="$root/.tools/node_modules/solc"
if [ ! -f "$solc_dir/index.js" ]; then
    echo "build-contracts: solc-js is missing; run scripts/setup.sh" >&2
    exit 1
fi
cd "$root/contracts"

# Production sources, and the test-only verifier that the Rust integration tests deploy.
sources=(src/*.sol)
test_only=(test/TestTickVerifier.sol test/FilecoinActorsDouble.sol)
mkdir -p artifacts artifacts/test-only

SOLC_DIR="$solc_dir" node - "${sources[@]}" -- "${test_only[@]}" <<'JS'
const fs = require('fs');
const path = require('path');
const solc = require(process.env.SOLC_DIR);

const args = process.argv.slice(2);
const split = args.indexOf('--');
const prod = args.slice(0, split);
const testOnly = args.slice(split + 1);

const sources = {};
for (const file of [...prod, ...testOnly]) sources[file] = { content: fs.readFileSync(file, 'utf8') };
const input = {
  language: 'Solidity',
  sources,
  settings: {
    optimizer: { enabled: true, runs: 10 },
    evmVersion: 'paris',
    // No metadata hash: the bytecode then depends only on the sources and settings.
    metadata: { bytecodeHash: 'none', appendCBOR: false },
    outputSelection: { '*': { '*': ['abi', 'evm.bytecode.object', 'evm.deployedBytecode.object'] } },
  },
};
// Imports resolve like forge's remappings in foundry.toml: npm packages (OpenZeppelin, pinned in
// tools/package.json) from .tools/node_modules, everything else relative to contracts/.
const nodeModules = path.join('..', '.tools', 'node_modules');
const resolveImport = (p) => {
  const file = p.startsWith('@openzeppelin/') ? path.join(nodeModules, p) : p;
  return fs.existsSync(file) ? { contents: fs.readFileSync(file, 'utf8') } : { error: `not found: ${p} (${file}); run scripts/setup.sh` };
};
const output = JSON.parse(solc.compile(JSON.stringify(input), { import: resolveImport }));
const errors = (output.errors || []).filter((e) => e.severity === 'error');
for (const e of output.errors || []) process.stderr.write(e.formattedMessage + '\n');
if (errors.length > 0) process.exit(1);

let written = 0;
for (const [file, contracts] of Object.entries(output.contracts)) {
  // Imported library sources (OpenZeppelin) are compiled into the contracts that use them;
  // they get no artifacts of their own.
  if (!prod.includes(file) && !testOnly.includes(file)) continue;
  for (const [name, c] of Object.entries(contracts)) {
    // Interfaces and abstract contracts have no bytecode: nothing to deploy, skip them
    // (their ABI is part of the contracts that implement them).
    if (!c.evm.bytecode.object) continue;
    const dir = testOnly.includes(file) ? 'artifacts/test-only' : 'artifacts';
    const artifact = {
      contractName: name,
      sourceName: file,
      compiler: `solc-js ${solc.version()}`,
      testOnly: testOnly.includes(file),
      abi: c.abi,
      bytecode: { object: '0x' + c.evm.bytecode.object },
      deployedBytecode: { object: '0x' + c.evm.deployedBytecode.object },
    };
    // Of the test helpers, only what the Rust tests deploy is exported: the verifier and the
    // Filecoin actor doubles.
    const exported = ['TestTickVerifier', 'CallActorByIdDouble', 'FilecoinActorDouble'];
    if (testOnly.includes(file) && !exported.includes(name)) continue;
    // A library of internal functions (FilecoinDeals) is compiled into its users.
    if (!testOnly.includes(file) && !c.abi.some((item) => item.type === 'function')) continue;
    fs.writeFileSync(path.join(dir, `${name}.json`), JSON.stringify(artifact, null, 2) + '\n');
    written++;
  }
}
process.stderr.write(`build-contracts: wrote ${written} artifacts with solc ${solc.version()}\n`);
JS

# What the artifacts were built from: the stale-artifact test recomputes these digests.
{
    for f in "${sources[@]}" "${test_only[@]}"; do sha256sum "$f"; done
} > artifacts/SOURCES.sha256
echo "build-contracts: ok"
