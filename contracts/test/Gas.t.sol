// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {MarketplaceBase} from "./MarketplaceBase.sol";
import {TestTickVerifier} from "./TestTickVerifier.sol";
import {Marketplace} from "../src/Marketplace.sol";
import {ITickVerifier} from "../src/ITickVerifier.sol";
import {RealProofs} from "./real/RealProofs.sol";
import {TickVerifier16} from "./real/TickVerifier16.sol";
import {TickVerifier64} from "./real/TickVerifier64.sol";
import {TickVerifier256} from "./real/TickVerifier256.sol";
import {TickVerifier1024} from "./real/TickVerifier1024.sol";

/// Gas of `claimWithAck` at every batch capacity a deployment may support, and of `claim` and
/// `acknowledge` alone (the figures in contracts/README.md):
///
///     forge test --match-contract GasTest --isolate -vv
///
/// `--isolate` runs every call of the test as its own transaction: cold storage, the 21,000
/// intrinsic gas and the calldata are included, as in a mined receipt. Without it the calls share
/// one transaction (warm slots, no intrinsic gas) and the figures read lower. The verifier here
/// is the test-only one; `test verifier` is what it cost inside the call: a Groth16 verifier
/// replaces it with about 223,000 gas of execution, the same at every capacity.
contract GasTest is MarketplaceBase {
    event log_named_uint(string key, uint256 val);

    uint64 constant GIB = 1 << 30;
    /// Regression budgets of a claim with an acknowledgment, less the test verifier, in either
    /// mode (isolated: 92,484 for the first batch and 92,526 for a later one; the first writes no
    /// slot from zero since `accept` marks the heads; intrinsic gas and calldata included).
    uint256 constant LATER_BUDGET = 95_000;
    uint256 constant FIRST_BUDGET = 95_000;

    uint32[4] internal caps = [uint32(16), 64, 256, 1024];
    /// Regression budget of a claim with an acknowledgment and the real Groth16 verifier, whole
    /// transaction (isolated: intrinsic gas and calldata included); measured 325,291-325,516 at
    /// every capacity, first and later batches alike. Issue 15's goal is 300,000: not met, the
    /// verifier's share (~233,000 here) leaves too little for the rest (see contracts/README.md).
    uint256 constant REAL_BUDGET = 330_000;

    function setUp() public override {
        vm.warp(T0);
        verifier = new TestTickVerifier();
        uint32[] memory cs = new uint32[](4);
        ITickVerifier[] memory vs = new ITickVerifier[](4);
        for (uint256 i = 0; i < 4; i++) {
            cs[i] = caps[i];
            vs[i] = verifier;
        }
        m = new Marketplace(cs, vs, CLAIM_WINDOW);
        reg = m.registry();
        vm.deal(client, 1_000 ether);
        vm.deal(sp, 1_000 ether);
        vm.deal(stranger, 1_000 ether);
        _register(sp);
    }

    function test_gas_claimWithAckAtEveryCapacity() public {
        for (uint256 i = 0; i < caps.length; i++) {
            _measure(caps[i]);
        }
    }

    function _measure(uint32 cap) internal {
        uint256 id = _createWith(_terms(), 100 ether);
        _accept(id);
        vm.warp(block.timestamp + 60);
        uint256 exec = _claimWithAck(id, cap, 60, 3 * GIB, 2 * GIB, _ack(id, _head(1), 60, 3 * GIB, 2 * GIB));
        uint256 verify = _verifyGas(id, cap);
        string memory name = string.concat("capacity ", _dec(cap));
        emit log_named_uint(string.concat(name, ": first claimWithAck"), exec);
        assertLe(exec - verify, FIRST_BUDGET, "first claim: the marketplace's own work");
        vm.warp(block.timestamp + 60);
        exec = _claimWithAck(id, cap, 60, 3 * GIB, 2 * GIB, _ack(id, _head(2), 120, 6 * GIB, 4 * GIB));
        emit log_named_uint(string.concat(name, ": later claimWithAck"), exec);
        emit log_named_uint(string.concat(name, ": test verifier"), verify);
        assertLe(exec - verify, LATER_BUDGET, "later claim: the marketplace's own work");
    }

    /// The same claims through the Groth16 verifiers the circuits crate generates (test/real/: a
    /// seeded setup, so forgeable; never deploy them) with real proofs of the same batches.
    function test_gas_claimWithAckWithTheRealVerifierAtEveryCapacity() public {
        uint32[] memory cs = new uint32[](4);
        ITickVerifier[] memory vs = new ITickVerifier[](4);
        vs[0] = ITickVerifier(address(new TickVerifier16()));
        vs[1] = ITickVerifier(address(new TickVerifier64()));
        vs[2] = ITickVerifier(address(new TickVerifier256()));
        vs[3] = ITickVerifier(address(new TickVerifier1024()));
        for (uint256 i = 0; i < 4; i++) {
            cs[i] = caps[i];
        }
        // The proofs hash the order key of one deployment: chain and marketplace address are fixed
        // by deploying from a fresh account (its first contract) on the fixtures' chain.
        vm.chainId(RealProofs.CHAIN_ID);
        vm.prank(RealProofs.DEPLOYER);
        m = new Marketplace(cs, vs, CLAIM_WINDOW);
        reg = m.registry();
        assertEq(address(m), RealProofs.MARKETPLACE, "the fixtures' marketplace (regenerate test/real/)");
        _register(sp);
        for (uint256 i = 0; i < caps.length; i++) {
            uint256 id = _createWith(_terms(), 100 ether);
            // The fixture's proofs are for order i + 1.
            assertEq(id, i + 1, "order id of the fixture");
            _accept(id);
            string memory name = string.concat("real verifier, capacity ", _dec(caps[i]));
            vm.warp(block.timestamp + 60);
            (bytes32 head, bytes memory proof) = RealProofs.batch(i, 0);
            uint256 exec = _realClaimWithAck(id, caps[i], proof, _ack(id, head, 60, 3 * GIB, 2 * GIB));
            emit log_named_uint(string.concat(name, ": first claimWithAck"), exec);
            assertLe(exec, REAL_BUDGET, "first claim with the real verifier");
            vm.warp(block.timestamp + 60);
            (head, proof) = RealProofs.batch(i, 1);
            exec = _realClaimWithAck(id, caps[i], proof, _ack(id, head, 120, 6 * GIB, 4 * GIB));
            emit log_named_uint(string.concat(name, ": later claimWithAck"), exec);
            assertLe(exec, REAL_BUDGET, "later claim with the real verifier");
        }
    }

    function _realClaimWithAck(uint256 id, uint32 cap, bytes memory proof, Marketplace.Acknowledgment memory ack)
        internal
        returns (uint256 exec)
    {
        bytes memory sig = _sign(ACK_KEY, ack);
        bytes memory data =
            abi.encodeCall(Marketplace.claimWithAck, (id, cap, ack.head, 60, 3 * GIB, 2 * GIB, proof, ack, sig));
        exec = _call(sp, data);
        assertEq(m.getOrder(id).head, ack.head, "claimed");
    }

    function test_gas_claimAndAcknowledgeAlone() public {
        uint256 id = _createWith(_terms(), 100 ether);
        _accept(id);
        vm.warp(block.timestamp + 60);
        bytes memory proof = _proof(id, _head(1), 60, 1, 2);
        bytes memory data = abi.encodeCall(Marketplace.claim, (id, CAP, _head(1), 60, 1, 2, proof));
        uint256 exec = _call(sp, data);
        emit log_named_uint("first claim (no ack)", exec);
        proof = _proof(id, _head(2), 0, 1, 2);
        data = abi.encodeCall(Marketplace.claim, (id, CAP, _head(2), 0, 1, 2, proof));
        exec = _call(sp, data);
        emit log_named_uint("later claim (no ack)", exec);

        Marketplace.Acknowledgment memory ack = _ack(id, _head(2), 60, 5, 5);
        data = abi.encodeCall(Marketplace.acknowledge, (id, ack, _sign(ACK_KEY, ack)));
        exec = _call(stranger, data);
        emit log_named_uint("first acknowledge", exec);
        ack = _ack(id, _head(3), 60, 50, 50);
        data = abi.encodeCall(Marketplace.acknowledge, (id, ack, _sign(ACK_KEY, ack)));
        exec = _call(stranger, data);
        emit log_named_uint("later acknowledge", exec);
    }

    /// A batch of `batchIn`/`batchOut` bytes over `secs`, with `ack` (cumulative totals).
    function _claimWithAck(
        uint256 id,
        uint32 cap,
        uint64 secs,
        uint64 batchIn,
        uint64 batchOut,
        Marketplace.Acknowledgment memory ack
    ) internal returns (uint256 exec) {
        bytes memory sig = _sign(ACK_KEY, ack);
        bytes memory proof = _proof(id, ack.head, secs, batchIn, batchOut);
        bytes memory data =
            abi.encodeCall(Marketplace.claimWithAck, (id, cap, ack.head, secs, batchIn, batchOut, proof, ack, sig));
        exec = _call(sp, data);
        assertEq(m.getOrder(id).head, ack.head, "claimed");
    }

    function _call(address from, bytes memory data) internal returns (uint256 exec) {
        vm.prank(from);
        uint256 before = gasleft();
        (bool ok,) = address(m).call(data);
        exec = before - gasleft();
        assertTrue(ok, "call succeeded");
    }

    function _verifyGas(uint256 id, uint32 cap) internal view returns (uint256) {
        uint256[6] memory input = [m.orderKey(id), uint256(m.getOrder(id).head), 1, 1, 1, 1];
        bytes memory proof = new bytes(256);
        ITickVerifier v = m.verifierFor(cap);
        uint256 before = gasleft();
        v.verifyClaim(input, proof);
        return before - gasleft();
    }

    function _dec(uint256 v) internal pure returns (string memory) {
        if (v == 0) return "0";
        uint256 len;
        for (uint256 t = v; t != 0; t /= 10) {
            len++;
        }
        bytes memory out = new bytes(len);
        while (v != 0) {
            out[--len] = bytes1(uint8(48 + (v % 10)));
            v /= 10;
        }
        return string(out);
    }
}
