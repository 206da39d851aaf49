// Prints `PATH PIECE_CID PIECE_SIZE` for each file argument, as @web3-storage/data-segment
// (FRC-0058) computes the piece: the independent implementation Shale's CommP is checked against.
import { readFileSync } from 'node:fs'
import { pathToFileURL } from 'node:url'

const modules = process.env.SHALE_NODE_MODULES
// The package is ESM-only with no plain main entry: import its module file directly.
const { Piece } = await import(pathToFileURL(`${modules}/@web3-storage/data-segment/src/lib.js`))
for (const path of process.argv.slice(2)) {
  const info = Piece.fromPayload(readFileSync(path)).toInfo()
  console.log(`${path} ${info.link} ${info.size}`)
}
