// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {MarketplaceBase} from "./MarketplaceBase.sol";
import {Marketplace} from "../src/Marketplace.sol";

/// The claim path: proofs over the stored head, lease-time and escrow bounds, the tariff.
contract ClaimsTest is MarketplaceBase {
    event Claimed(
        uint256 indexed orderId,
        bytes32 head,
        uint64 seconds_,
        uint64 bytesIn,
        uint64 bytesOut,
        uint256 amount,
        uint256 escrowLeft
    );

    uint256 constant GIB = 1 << 30;

    function test_claim_paysTheProviderAndStoresTheHead() public {
        uint256 id = _active();
        vm.warp(T0 + 60);
        uint256 spBefore = sp.balance;
        // 60 s and half a GiB plus 5 bytes: 60_000_180 + floor(3_500_000_033.1) wei.
        uint256 amount = 60 * PPS + (uint256(GIB / 2 + 5) * PPG) / GIB;
        assertEq(amount, 3_560_000_213, "worked example");
        vm.expectEmit(true, false, false, true);
        emit Claimed(id, _head(1), 60, uint64(GIB / 4), uint64(GIB / 4 + 5), amount, ESCROW - amount);
        _claim(id, _head(1), 60, uint64(GIB / 4), uint64(GIB / 4 + 5));

        Marketplace.Order memory o = m.getOrder(id);
        assertEq(sp.balance, spBefore + amount, "provider paid");
        assertEq(o.escrow, ESCROW - amount, "escrow reduced");
        assertEq(o.paid, amount, "paid total");
        assertEq(o.head, _head(1), "head stored");
        assertEq(o.claimedSeconds, 60, "seconds");
        assertEq(o.claimedBytes, GIB / 2 + 5, "bytes");
        assertEq(_claimableSeconds(id), 0, "nothing more to claim now");
    }

    function test_claim_chainsBatchesFromTheStoredHead() public {
        uint256 id = _active();
        vm.warp(T0 + 100);
        _claim(id, _head(1), 40, 10, 20);
        _claim(id, _head(2), 60, 30, 40);
        Marketplace.Order memory o = m.getOrder(id);
        assertEq(o.claimedSeconds, 100, "cumulative seconds");
        assertEq(o.claimedBytes, 100, "cumulative bytes");
        assertEq(o.head, _head(2), "latest head");
    }

    function test_claim_sameCommitmentTwiceIsRefused() public {
        uint256 id = _active();
        vm.warp(T0 + 100);
        bytes memory proof = _proof(id, _head(1), 10, 0, 0);
        vm.prank(sp);
        m.claim(id, CAP, _head(1), 10, 0, 0, proof);
        vm.expectRevert(abi.encodeWithSelector(Marketplace.CommitmentAlreadyPaid.selector, id, _head(1)));
        vm.prank(sp);
        m.claim(id, CAP, _head(1), 10, 0, 0, proof);
    }

    function test_claim_replayOfAnOlderProofFailsVerification() public {
        uint256 id = _active();
        vm.warp(T0 + 100);
        bytes memory first = _proof(id, _head(1), 10, 0, 0);
        vm.prank(sp);
        m.claim(id, CAP, _head(1), 10, 0, 0, first);
        _claim(id, _head(2), 10, 0, 0);
        // The old proof was made over head 0; the stored head is now 2.
        vm.expectRevert(abi.encodeWithSelector(Marketplace.InvalidProof.selector, id));
        vm.prank(sp);
        m.claim(id, CAP, _head(1), 10, 0, 0, first);
    }

    function test_claim_refusesAProofForOtherTotals() public {
        uint256 id = _active();
        vm.warp(T0 + 100);
        bytes memory proof = _proof(id, _head(1), 10, 0, 0);
        vm.expectRevert(abi.encodeWithSelector(Marketplace.InvalidProof.selector, id));
        vm.prank(sp);
        m.claim(id, CAP, _head(1), 11, 0, 0, proof);
    }

    function test_claim_refusesAProofOfAnotherOrder() public {
        uint256 a = _active();
        uint256 b = _active();
        vm.warp(T0 + 100);
        bytes memory proofForA = _proof(a, _head(1), 10, 0, 0);
        vm.expectRevert(abi.encodeWithSelector(Marketplace.InvalidProof.selector, b));
        vm.prank(sp);
        m.claim(b, CAP, _head(1), 10, 0, 0, proofForA);
    }

    /// The same vector as `shale_circuits::key`'s `known_answer_vector_matches_the_contract`: order 5
    /// of the first contract anvil's first account deploys, on anvil's chain.
    function test_orderKeyMatchesTheRustVector() public {
        assertEq(
            SNARK_SCALAR_FIELD,
            0x30644e72e131a029b85045b68181585d2833e84879b9709143e1f593f0000001,
            "the BN254 scalar field order r"
        );
        vm.chainId(31337);
        address at = 0x5FbDB2315678afecb367f032d93F642f64180aa3;
        vm.etch(at, address(m).code);
        assertEq(
            Marketplace(at).orderKey(5),
            0x095558abd95c7c26e1474e9bcbcf567febc7f4a4b8af60b16649357636b772f4,
            "the key Rust computes"
        );
    }

    function test_claim_refusesAProofForTheSameOrderOfAnotherDeployment() public {
        uint256 id = _active();
        vm.warp(T0 + 100);
        bytes32 prev = m.getOrder(id).head;
        // The inputs another marketplace (same order id) or another chain would check.
        uint256[2] memory foreign = [
            uint256(keccak256(abi.encode(block.chainid, address(0xbeef), id))) % SNARK_SCALAR_FIELD,
            uint256(keccak256(abi.encode(block.chainid + 1, address(m), id))) % SNARK_SCALAR_FIELD
        ];
        for (uint256 i = 0; i < foreign.length; i++) {
            uint256[6] memory input = [foreign[i], uint256(prev), uint256(_head(1)), 10, 0, 0];
            bytes memory proof = verifier.proofFor(input);
            vm.expectRevert(abi.encodeWithSelector(Marketplace.InvalidProof.selector, id));
            vm.prank(sp);
            m.claim(id, CAP, _head(1), 10, 0, 0, proof);
        }
        assertEq(
            m.orderKey(id),
            uint256(keccak256(abi.encode(block.chainid, address(m), id))) % SNARK_SCALAR_FIELD,
            "this deployment's key"
        );
    }

    function test_claim_beyondTheLeaseTimeSoFarIsRefused() public {
        uint256 id = _active();
        vm.warp(T0 + 30);
        bytes memory proof = _proof(id, _head(1), 31, 0, 0);
        vm.expectRevert(abi.encodeWithSelector(Marketplace.ClaimExceedsLeaseTime.selector, id, 31, 30));
        vm.prank(sp);
        m.claim(id, CAP, _head(1), 31, 0, 0, proof);

        // Cumulative: 20 + 11 > 30.
        _claim(id, _head(1), 20, 0, 0);
        proof = _proof(id, _head(2), 11, 0, 0);
        vm.expectRevert(abi.encodeWithSelector(Marketplace.ClaimExceedsLeaseTime.selector, id, 31, 30));
        vm.prank(sp);
        m.claim(id, CAP, _head(2), 11, 0, 0, proof);
    }

    event ClaimTrimmed(uint256 indexed orderId, uint64 provenSeconds, uint64 paidSeconds);

    function test_claim_afterTerminationIsTrimmedToTheTerminationTime() public {
        uint256 id = _active();
        vm.warp(T0 + 50);
        vm.prank(client);
        m.terminate(id);
        vm.warp(T0 + 500);
        assertEq(_claimableSeconds(id), 50, "50 s claimable after the end");
        // The last batch ran 1 s past the end (its tick closed after the termination landed):
        // it is paid up to the end, not refused.
        vm.expectEmit(true, false, false, true);
        emit ClaimTrimmed(id, 51, 50);
        vm.expectEmit(true, false, false, true);
        emit Claimed(id, _head(1), 50, 7, 0, 50 * PPS + (7 * PPG) / GIB, ESCROW - 50 * PPS - (7 * PPG) / GIB);
        _claim(id, _head(1), 51, 7, 0);
        assertEq(m.getOrder(id).claimedSeconds, 50, "paid up to the end");
        assertEq(m.getOrder(id).paid, 50 * PPS + (7 * PPG) / GIB, "50 s and the bytes");
        assertEq(_claimableSeconds(id), 0, "nothing more");
        // A later batch gets no more seconds but still its bytes.
        _claim(id, _head(2), 30, 3, 0);
        assertEq(m.getOrder(id).claimedSeconds, 50, "still the end");
        assertEq(m.getOrder(id).claimedBytes, 10, "bytes of both batches");
    }

    function test_claim_afterExpiryIsTrimmedToTheMaxDuration() public {
        uint256 id = _active();
        vm.warp(T0 + 10 * MAX_DURATION);
        _claim(id, _head(1), MAX_DURATION - 5, 0, 0);
        uint64 over = 100;
        vm.expectEmit(true, false, false, true);
        emit ClaimTrimmed(id, over, 5);
        _claim(id, _head(2), over, 0, 0);
        assertEq(m.getOrder(id).claimedSeconds, MAX_DURATION, "every second up to the expiry");
        assertEq(m.getOrder(id).paid, MAX_DURATION * PPS, "and not one more");
    }

    function test_claim_whileLiveBeyondTheLeaseTimeIsRefusedNotTrimmed() public {
        // While the lease runs, seconds beyond chain time are not yet earned: a trim would lose
        // them for good once the head moves on, so the batch waits.
        uint256 id = _active();
        vm.warp(T0 + 40);
        bytes memory proof = _proof(id, _head(1), 41, 0, 0);
        vm.expectRevert(abi.encodeWithSelector(Marketplace.ClaimExceedsLeaseTime.selector, id, 41, 40));
        vm.prank(sp);
        m.claim(id, CAP, _head(1), 41, 0, 0, proof);
        vm.warp(T0 + 41);
        vm.prank(sp);
        m.claim(id, CAP, _head(1), 41, 0, 0, proof);
        assertEq(m.getOrder(id).claimedSeconds, 41, "paid once the time came");
    }

    function test_claim_moreThanTheEscrowLeftIsRefused() public {
        Marketplace.Terms memory terms = _terms();
        uint256 escrow = 10 * PPS + 7;
        uint256 id = _createWith(terms, escrow);
        _accept(id);
        vm.warp(T0 + 100);
        bytes memory proof = _proof(id, _head(1), 11, 0, 0);
        vm.expectRevert(abi.encodeWithSelector(Marketplace.ClaimExceedsEscrow.selector, id, 11 * PPS, escrow));
        vm.prank(sp);
        m.claim(id, CAP, _head(1), 11, 0, 0, proof);
        // Exactly what is left minus the odd 7 wei is fine.
        _claim(id, _head(1), 10, 0, 0);
        assertEq(m.getOrder(id).escrow, 7, "7 wei left");
    }

    function test_claim_refusesStrangersUnknownCapacityAndHeadsOutsideTheField() public {
        uint256 id = _active();
        vm.warp(T0 + 100);
        bytes memory proof = _proof(id, _head(1), 10, 0, 0);
        vm.expectRevert(abi.encodeWithSelector(Marketplace.NotProvider.selector, id, client));
        vm.prank(client);
        m.claim(id, CAP, _head(1), 10, 0, 0, proof);

        vm.expectRevert(abi.encodeWithSelector(Marketplace.UnknownBatchCapacity.selector, 32));
        vm.prank(sp);
        m.claim(id, 32, _head(1), 10, 0, 0, proof);

        bytes32 big = bytes32(SNARK_SCALAR_FIELD);
        vm.expectRevert(abi.encodeWithSelector(Marketplace.HeadOutOfField.selector, big));
        vm.prank(sp);
        m.claim(id, CAP, big, 10, 0, 0, proof);

        vm.expectRevert(abi.encodeWithSelector(Marketplace.CommitmentAlreadyPaid.selector, id, bytes32(0)));
        vm.prank(sp);
        m.claim(id, CAP, bytes32(0), 10, 0, 0, proof);
    }

    function test_claim_refusesPendingCancelledAndSettledOrders() public {
        uint256 id = _create();
        bytes memory proof = _proof(id, _head(1), 0, 1, 0);
        vm.expectRevert(abi.encodeWithSelector(Marketplace.OrderNotActive.selector, id, Marketplace.OrderState.Pending));
        vm.prank(sp);
        m.claim(id, CAP, _head(1), 0, 1, 0, proof);

        vm.prank(sp);
        m.cancel(id);
        vm.expectRevert(
            abi.encodeWithSelector(Marketplace.OrderNotActive.selector, id, Marketplace.OrderState.Cancelled)
        );
        vm.prank(sp);
        m.claim(id, CAP, _head(1), 0, 1, 0, proof);

        uint256 id2 = _active();
        vm.warp(T0 + 10);
        vm.prank(client);
        m.terminate(id2);
        vm.prank(sp);
        m.settle(id2);
        proof = _proof(id2, _head(1), 10, 0, 0);
        vm.expectRevert(abi.encodeWithSelector(Marketplace.AlreadySettled.selector, id2));
        vm.prank(sp);
        m.claim(id2, CAP, _head(1), 10, 0, 0, proof);
    }

    function test_claim_floorsTheByteChargeInTheClientsFavour() public {
        uint256 id = _active();
        vm.warp(T0 + 2);
        // One byte less than a GiB at 7_000_000_001 wei/GiB: 7_000_000_001 * (2^30 - 1) / 2^30
        // = 6_999_999_994.48... floors to 6_999_999_994.
        uint256 before = sp.balance;
        _claim(id, _head(1), 0, uint64(GIB - 1), 0);
        assertEq(sp.balance - before, 6_999_999_994, "floored");
        before = sp.balance;
        _claim(id, _head(2), 0, 0, 1);
        assertEq(sp.balance - before, 6, "one byte: 7_000_000_001 / 2^30 = 6.5 -> 6");
        before = sp.balance;
        _claim(id, _head(3), 2, 0, 0);
        assertEq(sp.balance - before, 2 * PPS, "seconds");
        uint256 other = _active();
        before = sp.balance;
        _claim(other, _head(1), 0, uint64(GIB), 0);
        assertEq(sp.balance - before, PPG, "exact GiB");
    }

    function testFuzz_claimAmountMatchesTheTariff(uint64 secs, uint64 bytesIn, uint64 bytesOut) public {
        secs = uint64(bound(secs, 1, MAX_DURATION));
        // Up to 1 PiB each way: the charge then stays below the 100 ether escrow.
        bytesIn = uint64(bound(bytesIn, 0, 1 << 50));
        bytesOut = uint64(bound(bytesOut, 0, 1 << 50));
        Marketplace.Terms memory terms = _terms();
        terms.byteAllowance = type(uint64).max;
        uint256 id = _createWith(terms, 100 ether);
        _accept(id);
        vm.warp(T0 + MAX_DURATION);
        uint256 expected = uint256(secs) * PPS + ((uint256(bytesIn) + uint256(bytesOut)) * PPG) / GIB;
        uint256 spBefore = sp.balance;
        _claim(id, _head(1), secs, bytesIn, bytesOut);
        assertEq(sp.balance - spBefore, expected, "paid the tariff");
        assertEq(m.getOrder(id).escrow, 100 ether - expected, "escrow");
    }

    function testFuzz_cumulativeClaimsNeverExceedTheWallClock(uint64 a, uint64 b, uint32 elapsed) public {
        uint256 id = _active();
        elapsed = uint32(bound(elapsed, 0, 2 * MAX_DURATION));
        a = uint64(bound(a, 0, 2 * MAX_DURATION));
        b = uint64(bound(b, 0, 2 * MAX_DURATION));
        vm.warp(T0 + elapsed);
        uint64 allowed = elapsed < MAX_DURATION ? uint64(elapsed) : MAX_DURATION;
        // Expired (elapsed >= MAX_DURATION): batches past the end are trimmed, not refused.
        bool ended = elapsed >= MAX_DURATION;
        uint64 claimed;
        if (a <= allowed || ended) {
            _claim(id, _head(1), a, 0, 0);
            claimed = a <= allowed ? a : allowed;
        } else {
            bytes memory proof = _proof(id, _head(1), a, 0, 0);
            vm.expectRevert(abi.encodeWithSelector(Marketplace.ClaimExceedsLeaseTime.selector, id, a, allowed));
            vm.prank(sp);
            m.claim(id, CAP, _head(1), a, 0, 0, proof);
        }
        if (claimed + b <= allowed || ended) {
            _claim(id, _head(2), b, 0, 0);
            claimed = claimed + b <= allowed ? claimed + b : allowed;
        }
        assertLe(m.getOrder(id).claimedSeconds, allowed, "never beyond the lease time");
        assertEq(m.getOrder(id).claimedSeconds, claimed, "claimed");
    }
}
