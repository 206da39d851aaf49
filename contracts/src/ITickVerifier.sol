// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// Implemented by the Groth16 verifiers that the circuits crate generates (one per batch capacity).
interface ITickVerifier {
    /// input = [orderId, prevHead, nextHead, seconds, bytesIn, bytesOut] (each < BN254 scalar field r).
    /// proof = 256 bytes: A.x, A.y, B.x.c1, B.x.c0, B.y.c1, B.y.c0, C.x, C.y (32-byte big-endian words).
    function verifyClaim(uint256[6] calldata input, bytes calldata proof) external view returns (bool);
}
