// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ITickVerifier} from "../src/ITickVerifier.sol";

/// TEST ONLY. Stands in for the Groth16 verifier in tests of the marketplace's claim path.
/// It is not permissive: a "proof" is valid only when its first word is keccak256 of the six
/// public inputs (and it has the real proof's 256-byte length), so tests still exercise every
/// check that depends on the inputs (stored head, totals, order id). Never deploy it to a real chain.
contract TestTickVerifier is ITickVerifier {
    function verifyClaim(uint256[6] calldata input, bytes calldata proof) external pure returns (bool) {
        if (proof.length != 256) return false;
        return bytes32(proof[0:32]) == keccak256(abi.encodePacked(input));
    }

    /// Builds the proof this verifier accepts for the given inputs.
    function proofFor(uint256[6] calldata input) external pure returns (bytes memory proof) {
        proof = new bytes(256);
        bytes32 word = keccak256(abi.encodePacked(input));
        assembly {
            mstore(add(proof, 32), word)
        }
    }
}
