// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {MarketplaceBase} from "./MarketplaceBase.sol";
import {Marketplace} from "../src/Marketplace.sol";
import {ITickVerifier} from "../src/ITickVerifier.sol";

/// The client's EIP-712 acknowledgments and the byte rule of `claim`: cumulative bytes paid never
/// exceed max(the largest acknowledged total, the order's byte allowance).
contract AcknowledgmentsTest is MarketplaceBase {
    event Acknowledged(uint256 indexed orderId, bytes32 head, uint64 seconds_, uint64 bytesIn, uint64 bytesOut);
    event BytesTrimmed(uint256 indexed orderId, uint256 provenBytes, uint256 paidBytes);

    uint64 constant GIB = 1 << 30;
    /// secp256k1 group order: s above n/2 is the malleable twin of a signature.
    uint256 constant SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141;

    // ------------------------------------------------------------ the digest, pinned

    /// The test vector the Rust side checks its digest and signature against (contracts/README.md):
    /// chain 31337, marketplace 0x5FbDB2315678afecb367f032d93F642f64180aa3 (anvil's first
    /// deployment), order 7, head 0x0101...01, 60 s, 1000 bytes in, 2000 bytes out, signed by the
    /// private key 0xA11CE. The digest was also computed independently (keccak in node).
    function test_digest_matchesThePinnedVector() public {
        address pinnedAt = 0x5FbDB2315678afecb367f032d93F642f64180aa3;
        vm.chainId(31337);
        vm.etch(pinnedAt, address(m).code);
        Marketplace pinned = Marketplace(pinnedAt);
        // The type hash is internal (runtime size); the digest below pins the contract's use of it.
        assertEq(
            keccak256("Acknowledgment(uint256 orderId,bytes32 head,uint64 seconds,uint64 bytesIn,uint64 bytesOut)"),
            0x603b8206bdf0c5e034b5c10b98e7a97ed94f4d6349cfb45adbdc9cc1a8989b78,
            "pinned type hash"
        );
        assertEq(
            _domainSeparator(pinned),
            0xc9f9c9d90e145c8eb0493f8dc379db63755c8ec62d352788f78b8d9ba4d630f1,
            "domain separator"
        );
        Marketplace.Acknowledgment memory ack = _ack(
            7, bytes32(uint256(0x0101010101010101010101010101010101010101010101010101010101010101)), 60, 1000, 2000
        );
        bytes32 digest = pinned.acknowledgmentDigest(ack);
        assertEq(digest, 0x6699503f3a72bbd987a3649f20ddc8871bad08498cce1db4ddf81835b38ae98c, "digest");

        // RFC 6979 signatures are deterministic: the same key signs the same bytes everywhere.
        assertEq(vm.addr(ACK_KEY), 0xe05fcC23807536bEe418f142D19fa0d21BB0cfF7, "signer of key 0xA11CE");
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(ACK_KEY, digest);
        // The same 65 bytes as `cast wallet sign --no-hash --private-key 0xa11ce <digest>`.
        assertEq(r, 0x696c74b256ab7f1c21e5efcb6529af3f3c49cb559fc3a660cd497b4860e2a4a6, "r");
        assertEq(s, 0x43dcfdd4d241fa83b6277220beb39a05771f8a9c7752cc8fd443aba1928fc13b, "s");
        assertEq(v, 28, "v");
        // And the contract takes that signature from that key on that deployment.
        assertEq(ecrecover(digest, v, r, s), vm.addr(ACK_KEY), "recovers the key");
    }

    /// The EIP-712 domain separator built from the fields `eip712Domain()` (ERC-5267) reports.
    function _domainSeparator(Marketplace market) internal view returns (bytes32) {
        (, string memory name, string memory version, uint256 chainId, address verifyingContract,,) =
            market.eip712Domain();
        return keccak256(
            abi.encode(
                keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"),
                keccak256(bytes(name)),
                keccak256(bytes(version)),
                chainId,
                verifyingContract
            )
        );
    }

    function test_domain_isTheERC5267Domain() public view {
        (
            bytes1 fields,
            string memory name,
            string memory version,
            uint256 chainId,
            address verifyingContract,
            bytes32 salt,
            uint256[] memory extensions
        ) = m.eip712Domain();
        assertEq(uint256(uint8(fields)), 0x0f, "name, version, chain id, contract");
        assertEq(name, "Shale Marketplace", "name");
        assertEq(version, "1", "version");
        assertEq(chainId, block.chainid, "chain");
        assertEq(verifyingContract, address(m), "contract");
        assertEq(salt, bytes32(0), "no salt");
        assertEq(extensions.length, 0, "no extensions");
    }

    function test_digest_bindsTheChainTheContractAndEveryField() public {
        Marketplace.Acknowledgment memory ack = _ack(1, _head(9), 60, 1000, 2000);
        bytes32 digest = m.acknowledgmentDigest(ack);
        assertTrue(m.acknowledgmentDigest(_ack(2, _head(9), 60, 1000, 2000)) != digest, "order");
        assertTrue(m.acknowledgmentDigest(_ack(1, _head(8), 60, 1000, 2000)) != digest, "head");
        assertTrue(m.acknowledgmentDigest(_ack(1, _head(9), 61, 1000, 2000)) != digest, "seconds");
        assertTrue(m.acknowledgmentDigest(_ack(1, _head(9), 60, 1001, 2000)) != digest, "bytes in");
        assertTrue(m.acknowledgmentDigest(_ack(1, _head(9), 60, 1000, 2001)) != digest, "bytes out");
        // In and out are bound separately: swapping them is another acknowledgment.
        assertTrue(m.acknowledgmentDigest(_ack(1, _head(9), 60, 2000, 1000)) != digest, "in/out swapped");

        Marketplace other = _deploy();
        assertTrue(other.acknowledgmentDigest(ack) != digest, "another marketplace");
        uint256 chain = block.chainid;
        vm.chainId(314159);
        assertTrue(m.acknowledgmentDigest(ack) != digest, "another chain");
        vm.chainId(chain);
        assertEq(m.acknowledgmentDigest(ack), digest, "back on the first chain");
    }

    // ------------------------------------------------------------ acknowledge

    function test_acknowledge_recordsTheTotalAndHeadAndAnyoneMaySubmit() public {
        uint256 id = _active();
        Marketplace.Acknowledgment memory ack = _ack(id, _head(5), 30, 2 * GIB, 3 * GIB);
        bytes memory sig = _sign(ACK_KEY, ack);
        vm.expectEmit(true, false, false, true);
        emit Acknowledged(id, _head(5), 30, uint64(2 * GIB), uint64(3 * GIB));
        vm.prank(stranger);
        m.acknowledge(id, ack, sig);
        Marketplace.Order memory o = m.getOrder(id);
        assertEq(o.ackedBytes, 5 * GIB, "largest acknowledged total");
        assertEq(o.ackedHead, _head(5), "its head");
        assertEq(_claimableBytes(id), 5 * GIB, "claimable: the acknowledged total");
    }

    function test_acknowledge_anOlderTotalIsRefusedAndAnEqualOneReplacesTheHead() public {
        uint256 id = _active();
        _acknowledge(id, _head(2), 20, 100, 200);
        Marketplace.Acknowledgment memory older = _ack(id, _head(1), 10, 100, 199);
        bytes memory sig = _sign(ACK_KEY, older);
        vm.expectRevert(abi.encodeWithSelector(Marketplace.AckOlderThanRecorded.selector, id, 299, 300));
        m.acknowledge(id, older, sig);

        // Same total (no bytes moved in between): accepted, the head follows.
        _acknowledge(id, _head(3), 40, 150, 150);
        assertEq(m.getOrder(id).ackedBytes, 300, "total unchanged");
        assertEq(m.getOrder(id).ackedHead, _head(3), "newer head");
        _acknowledge(id, _head(4), 50, 150, 151);
        assertEq(m.getOrder(id).ackedBytes, 301, "raised");
    }

    function test_acknowledge_refusesAnotherSignerAndMalformedSignatures() public {
        uint256 id = _active();
        Marketplace.Acknowledgment memory ack = _ack(id, _head(1), 10, 1, 2);
        address signer = vm.addr(ACK_KEY);
        uint256 otherKey = 0xB0B;
        bytes memory wrong = _sign(otherKey, ack);
        vm.expectRevert(abi.encodeWithSelector(Marketplace.InvalidAckSignature.selector, id, signer, vm.addr(otherKey)));
        m.acknowledge(id, ack, wrong);

        // The SP's own key is as foreign as any other.
        bytes memory short = new bytes(64);
        vm.expectRevert(abi.encodeWithSelector(Marketplace.InvalidAckSignature.selector, id, signer, address(0)));
        m.acknowledge(id, ack, short);
        bytes memory zeros = new bytes(65);
        vm.expectRevert(abi.encodeWithSelector(Marketplace.InvalidAckSignature.selector, id, signer, address(0)));
        m.acknowledge(id, ack, zeros);
        assertEq(m.getOrder(id).ackedBytes, 0, "nothing recorded");
    }

    function test_acknowledge_refusesTheMalleableTwinOfAValidSignature() public {
        uint256 id = _active();
        Marketplace.Acknowledgment memory ack = _ack(id, _head(1), 10, 1, 2);
        bytes32 digest = m.acknowledgmentDigest(ack);
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(ACK_KEY, digest);
        // (r, n - s, v ^ 1) recovers the same key with raw ecrecover; it must not verify.
        bytes32 highS = bytes32(SECP256K1_N - uint256(s));
        uint8 flipped = v == 27 ? 28 : 27;
        assertEq(ecrecover(digest, flipped, r, highS), vm.addr(ACK_KEY), "raw ecrecover accepts the twin");
        vm.expectRevert(
            abi.encodeWithSelector(Marketplace.InvalidAckSignature.selector, id, vm.addr(ACK_KEY), address(0))
        );
        m.acknowledge(id, ack, abi.encodePacked(r, highS, flipped));
        m.acknowledge(id, ack, abi.encodePacked(r, s, v));
        assertEq(m.getOrder(id).ackedBytes, 3, "the canonical one verifies");
    }

    function test_acknowledge_ofAnotherOrderIsRefused() public {
        uint256 a = _active();
        uint256 b = _active();
        Marketplace.Acknowledgment memory forA = _ack(a, _head(1), 10, 1, 2);
        bytes memory sig = _sign(ACK_KEY, forA);
        // Named for A, submitted for B.
        vm.expectRevert(abi.encodeWithSelector(Marketplace.AckForAnotherOrder.selector, b, a));
        m.acknowledge(b, forA, sig);
        // Relabelled as B: the signature no longer matches (both orders share the ack key here).
        Marketplace.Acknowledgment memory relabelled = _ack(b, _head(1), 10, 1, 2);
        vm.expectRevert();
        m.acknowledge(b, relabelled, sig);
        assertEq(m.getOrder(b).ackedBytes, 0, "B unchanged");
    }

    function test_acknowledge_fromAnotherDeploymentOrChainIsRefused() public {
        uint256 id = _active();
        Marketplace other = _deploy();
        Marketplace.Acknowledgment memory ack = _ack(id, _head(1), 10, 1, 2);
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(ACK_KEY, other.acknowledgmentDigest(ack));
        vm.expectRevert();
        m.acknowledge(id, ack, abi.encodePacked(r, s, v));

        uint256 chain = block.chainid;
        vm.chainId(314159);
        bytes memory onOtherChain = _sign(ACK_KEY, ack);
        vm.chainId(chain);
        vm.expectRevert();
        m.acknowledge(id, ack, onOtherChain);
        assertEq(m.getOrder(id).ackedBytes, 0, "nothing recorded");
    }

    function test_acknowledge_withoutAnAckSignerIsRefused() public {
        Marketplace.Terms memory terms = _terms();
        terms.ackSigner = address(0);
        uint256 id = _createWith(terms, ESCROW);
        _accept(id);
        Marketplace.Acknowledgment memory ack = _ack(id, _head(1), 10, 1, 2);
        bytes memory sig = _sign(ACK_KEY, ack);
        vm.expectRevert(abi.encodeWithSelector(Marketplace.NoAckSigner.selector, id));
        m.acknowledge(id, ack, sig);
    }

    function test_acknowledge_refusesPendingAndSettledOrders() public {
        uint256 id = _create();
        Marketplace.Acknowledgment memory ack = _ack(id, _head(1), 10, 1, 2);
        bytes memory sig = _sign(ACK_KEY, ack);
        vm.expectRevert(abi.encodeWithSelector(Marketplace.OrderNotActive.selector, id, Marketplace.OrderState.Pending));
        m.acknowledge(id, ack, sig);
        _accept(id);
        vm.prank(sp);
        m.terminate(id);
        // Ended but not settled: the last acknowledgment may still land.
        m.acknowledge(id, ack, sig);
        vm.prank(sp);
        m.settle(id);
        vm.expectRevert(abi.encodeWithSelector(Marketplace.AlreadySettled.selector, id));
        m.acknowledge(id, ack, sig);
    }

    // ------------------------------------------------------------ the byte rule in claim

    /// The audit's exploit: right after accept, one honest-looking tick of 0 seconds and N bytes,
    /// N large enough to take the whole escrow. Claimed directly it is paid at most the
    /// allowance (the rest is forfeited for good); the same batch acknowledged first is paid in
    /// full.
    function test_exploit_aZeroSecondHugeByteBatchRightAfterAcceptIsPaidOnlyTheAllowanceUnlessAcknowledged()
        public
    {
        uint256 id = _active();
        uint64 huge = uint64((ESCROW * GIB) / PPG); // the bytes that cost the whole escrow
        assertLe(_price(0, huge), ESCROW, "fits the escrow");
        assertTrue(ESCROW - _price(0, huge) < PPG, "and takes nearly all of it");
        uint256 spBefore = sp.balance;
        vm.expectEmit(true, false, false, true);
        emit BytesTrimmed(id, huge, BYTE_ALLOWANCE);
        _claim(id, _head(1), 0, 0, huge);
        assertEq(sp.balance - spBefore, _price(0, BYTE_ALLOWANCE), "paid the allowance only");
        assertEq(m.getOrder(id).escrow, ESCROW - _price(0, BYTE_ALLOWANCE), "the escrow kept the rest");
        assertEq(m.getOrder(id).claimedBytes, huge, "every proved byte counts as claimed");
        // An acknowledgment that arrives later pays none of the forfeited bytes.
        _acknowledge(id, _head(1), 0, 0, huge);
        assertEq(_claimableBytes(id), 0, "forfeited for good");
        spBefore = sp.balance;
        _claim(id, _head(2), 0, 0, 0);
        assertEq(sp.balance, spBefore, "nothing more");

        // The client's tunnel saw those bytes on the wire and acknowledged them first: paid in full.
        uint256 other = _active();
        _acknowledge(other, _head(1), 0, 0, huge);
        spBefore = sp.balance;
        _claim(other, _head(1), 0, 0, huge);
        assertEq(sp.balance - spBefore, _price(0, huge), "paid for the acknowledged bytes");
        assertEq(m.getOrder(other).claimedBytes, huge, "claimed");
    }

    function test_claim_bytesUpToTheAllowanceNeedNoAcknowledgment() public {
        uint256 id = _active();
        vm.warp(T0 + 10);
        _claim(id, _head(1), 5, BYTE_ALLOWANCE / 2, 0);
        _claim(id, _head(2), 5, 0, BYTE_ALLOWANCE / 2);
        assertEq(m.getOrder(id).claimedBytes, BYTE_ALLOWANCE, "the whole allowance");
        assertEq(_claimableBytes(id), 0, "nothing more without an acknowledgment");
        vm.warp(T0 + 20);
        // Past the allowance the seconds are still paid in full; the byte is forfeited.
        uint256 spBefore = sp.balance;
        vm.expectEmit(true, false, false, true);
        emit BytesTrimmed(id, 1, 0);
        _claim(id, _head(3), 10, 1, 0);
        assertEq(sp.balance - spBefore, _price(10, 0), "seconds only");
        Marketplace.Order memory o = m.getOrder(id);
        assertEq(o.claimedSeconds, 20, "seconds paid");
        assertEq(o.claimedBytes, uint256(BYTE_ALLOWANCE) + 1, "the forfeited byte counts as claimed");
    }

    function test_claim_theBoundIsTheLargerOfAckAndAllowance() public {
        uint256 id = _active();
        // An acknowledgment below the allowance does not lower it.
        _acknowledge(id, _head(7), 0, 10, 0);
        _claim(id, _head(1), 0, BYTE_ALLOWANCE, 0);
        // Above the allowance, the acknowledgment is the bound, cumulatively.
        _acknowledge(id, _head(8), 0, BYTE_ALLOWANCE + 100, 50);
        _claim(id, _head(2), 0, 100, 49);
        // One byte of room left: a 2 GiB batch is paid that byte and forfeits the rest.
        uint256 spBefore = sp.balance;
        vm.expectEmit(true, false, false, true);
        emit BytesTrimmed(id, 2 * uint256(GIB), 1);
        _claim(id, _head(3), 0, 0, 2 * GIB);
        assertEq(sp.balance - spBefore, _price(0, 1), "paid exactly the acknowledged total");
        // A later, larger acknowledgment is measured against every claimed byte: the forfeited
        // ones are not paid by it.
        _acknowledge(id, _head(9), 0, BYTE_ALLOWANCE + 99 + 2 * GIB, 50);
        assertEq(_claimableBytes(id), 0, "nothing past the claimed total");
        _acknowledge(id, _head(10), 0, BYTE_ALLOWANCE + 106 + 2 * GIB, 50);
        assertEq(_claimableBytes(id), 7, "only what the ack adds above the claimed total");
    }

    function test_claim_withoutAnAckSignerIsBoundedByTheAllowanceForever() public {
        Marketplace.Terms memory terms = _terms();
        terms.ackSigner = address(0);
        terms.byteAllowance = 1000;
        uint256 id = _createWith(terms, ESCROW);
        _accept(id);
        _claim(id, _head(1), 0, 600, 400);
        uint256 spBefore = sp.balance;
        vm.expectEmit(true, false, false, true);
        emit BytesTrimmed(id, 5 * uint256(GIB), 0);
        _claim(id, _head(2), 0, 5 * GIB, 0);
        assertEq(sp.balance, spBefore, "no byte past the allowance is paid");
    }

    /// Claimed bytes count every proved byte, past any bound: a provider that proves absurd byte
    /// totals is paid the allowance once and never again.
    function test_claim_claimedBytesCountEveryProvedByte() public {
        uint256 id = _createWith(_terms(), 100 ether);
        _accept(id);
        uint64 max = type(uint64).max;
        for (uint256 i = 1; i <= 3; i++) {
            _claim(id, _head(i), 0, max, max);
        }
        assertEq(m.getOrder(id).claimedBytes, 6 * uint256(max), "cumulative, no truncation");
        assertEq(m.getOrder(id).paid, _price(0, BYTE_ALLOWANCE), "only the allowance was ever paid");
    }

    function test_claimWithAck_recordsThenPaysInOneCall() public {
        uint256 id = _createWith(_terms(), 100 ether);
        _accept(id);
        vm.warp(T0 + 30);
        uint64 moved = 5 * GIB;
        Marketplace.Acknowledgment memory ack = _ack(id, _head(1), 30, moved, 0);
        bytes memory sig = _sign(ACK_KEY, ack);
        bytes memory proof = _proof(id, _head(1), 30, moved, 0);
        uint256 spBefore = sp.balance;
        vm.expectEmit(true, false, false, true);
        emit Acknowledged(id, _head(1), 30, moved, 0);
        vm.prank(sp);
        m.claimWithAck(id, CAP, _head(1), 30, moved, 0, proof, ack, sig);
        assertEq(sp.balance - spBefore, 30 * PPS + 5 * PPG, "paid");
        Marketplace.Order memory o = m.getOrder(id);
        assertEq(o.ackedBytes, moved, "ack recorded");
        assertEq(o.claimedBytes, moved, "bytes paid");
        assertEq(o.head, _head(1), "head");
    }

    function test_claimWithAck_aBadAcknowledgmentRefusesTheWholeCall() public {
        uint256 id = _active();
        uint64 moved = GIB + GIB / 4; // past the allowance, within the escrow
        Marketplace.Acknowledgment memory ack = _ack(id, _head(1), 0, moved, 0);
        bytes memory wrong = _sign(0xB0B, ack);
        bytes memory proof = _proof(id, _head(1), 0, moved, 0);
        vm.expectRevert(
            abi.encodeWithSelector(Marketplace.InvalidAckSignature.selector, id, vm.addr(ACK_KEY), vm.addr(0xB0B))
        );
        vm.prank(sp);
        m.claimWithAck(id, CAP, _head(1), 0, moved, 0, proof, ack, wrong);

        // An acknowledgment that covers one byte less than the batch: recorded, and the claim is
        // paid all but that byte.
        Marketplace.Acknowledgment memory tooSmall = _ack(id, _head(1), 0, moved - 1, 0);
        bytes memory sig = _sign(ACK_KEY, tooSmall);
        uint256 spBefore = sp.balance;
        vm.prank(sp);
        m.claimWithAck(id, CAP, _head(1), 0, moved, 0, proof, tooSmall, sig);
        assertEq(m.getOrder(id).ackedBytes, moved - 1, "the acknowledgment was recorded");
        assertEq(sp.balance - spBefore, _price(0, moved - 1), "paid up to the acknowledged total");
    }

    function test_claimWithAck_onlyTheProviderMayClaim() public {
        uint256 id = _active();
        Marketplace.Acknowledgment memory ack = _ack(id, _head(1), 0, 1, 0);
        bytes memory sig = _sign(ACK_KEY, ack);
        bytes memory proof = _proof(id, _head(1), 0, 1, 0);
        vm.expectRevert(abi.encodeWithSelector(Marketplace.NotProvider.selector, id, stranger));
        vm.prank(stranger);
        m.claimWithAck(id, CAP, _head(1), 0, 1, 0, proof, ack, sig);
    }

    // ------------------------------------------------------------ helpers

    function _deploy() internal returns (Marketplace) {
        uint32[] memory caps = new uint32[](1);
        caps[0] = CAP;
        ITickVerifier[] memory vs = new ITickVerifier[](1);
        vs[0] = verifier;
        return new Marketplace(caps, vs, CLAIM_WINDOW);
    }
}
