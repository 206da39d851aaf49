// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {MarketplaceBase} from "./MarketplaceBase.sol";
import {Marketplace} from "../src/Marketplace.sol";

/// A client that is a contract and can refuse ether, to prove one party cannot block the other.
contract StubbornClient {
    Marketplace internal immutable m;
    bool public refuse = true;

    constructor(Marketplace market) payable {
        m = market;
    }

    function order(address provider, Marketplace.Terms calldata terms, uint256 escrow) external returns (uint256) {
        return m.createOrder{value: escrow}(provider, terms);
    }

    function terminate(uint256 id) external {
        m.terminate(id);
    }

    function cancel(uint256 id) external {
        m.cancel(id);
    }

    function setRefuse(bool value) external {
        refuse = value;
    }

    function withdraw() external {
        m.withdraw();
    }

    receive() external payable {
        require(!refuse, "no ether please");
    }
}

/// Settlement after the end: refunds, collateral, the slashing rule, and that no wei leaks.
contract SettlementTest is MarketplaceBase {
    event OrderSettled(uint256 indexed orderId, uint256 refund, uint256 collateralReturned, uint256 collateralSlashed);
    event PaymentDeferred(address indexed to, uint256 amount);

    function test_settle_byAnyoneAfterTheClaimWindowPaysEveryWeiOut() public {
        uint256 sum = _sumOfBalances();
        uint256 clientBefore = client.balance;
        uint256 spBefore = sp.balance;
        uint256 id = _active();
        vm.warp(T0 + 77);
        _claim(id, _head(1), 70, 12_345, 678);
        uint256 paid = m.getOrder(id).paid;
        vm.prank(client);
        m.terminate(id);
        vm.warp(T0 + 77 + m.CLAIM_WINDOW());
        vm.expectEmit(true, false, false, true);
        emit OrderSettled(id, ESCROW - paid, COLLATERAL, 0);
        vm.prank(stranger);
        m.settle(id);

        assertEq(client.balance, clientBefore - paid, "client paid exactly the claims");
        assertEq(sp.balance, spBefore + paid, "provider got claims and its collateral back");
        assertEq(address(m).balance, 0, "nothing stays in the contract");
        assertEq(_sumOfBalances(), sum, "no wei created or lost");
        assertTrue(m.getOrder(id).settled, "settled");
        assertEq(m.getOrder(id).escrow, 0, "escrow emptied");
    }

    function test_settle_byClientInsideTheClaimWindowIsRefused() public {
        uint256 id = _active();
        vm.warp(T0 + 10);
        vm.prank(client);
        m.terminate(id);
        uint64 settleableAt = uint64(T0 + 10 + m.CLAIM_WINDOW());
        vm.warp(settleableAt - 1);
        vm.expectRevert(abi.encodeWithSelector(Marketplace.ClaimWindowOpen.selector, id, settleableAt));
        vm.prank(client);
        m.settle(id);
    }

    function test_settle_byProviderEarlyGivesUpFurtherClaims() public {
        uint256 id = _active();
        vm.warp(T0 + 10);
        vm.prank(client);
        m.terminate(id);
        vm.prank(sp);
        m.settle(id);
        bytes memory proof = _proof(id, _head(1), 10, 0, 0);
        vm.expectRevert(abi.encodeWithSelector(Marketplace.AlreadySettled.selector, id));
        vm.prank(sp);
        m.claim(id, CAP, _head(1), 10, 0, 0, proof);
    }

    function test_settle_refusesLivePendingCancelledAndSettledOrders() public {
        uint256 id = _create();
        vm.expectRevert(abi.encodeWithSelector(Marketplace.OrderNotEnded.selector, id, Marketplace.OrderState.Pending));
        m.settle(id);
        _accept(id);
        vm.expectRevert(abi.encodeWithSelector(Marketplace.OrderNotEnded.selector, id, Marketplace.OrderState.Active));
        m.settle(id);
        vm.prank(sp);
        m.terminate(id);
        vm.prank(sp);
        m.settle(id);
        vm.expectRevert(abi.encodeWithSelector(Marketplace.AlreadySettled.selector, id));
        vm.prank(sp);
        m.settle(id);

        uint256 id2 = _create();
        vm.prank(sp);
        m.cancel(id2);
        vm.expectRevert(
            abi.encodeWithSelector(Marketplace.OrderNotEnded.selector, id2, Marketplace.OrderState.Cancelled)
        );
        m.settle(id2);
    }

    function test_settle_ofAnExpiredOrderPinsTheEndToTheExpiry() public {
        uint256 id = _active();
        vm.warp(T0 + MAX_DURATION + m.CLAIM_WINDOW());
        vm.expectEmit(true, false, false, true);
        emit OrderSettled(id, ESCROW, COLLATERAL, 0);
        m.settle(id);
        Marketplace.Order memory o = m.getOrder(id);
        assertEq(uint256(o.state), uint256(Marketplace.OrderState.Ended), "ended");
        assertEq(o.endedAt, T0 + MAX_DURATION, "ended at expiry");
    }

    function test_slash_providerTerminatingEarlyForfeitsTheUnservedShareRoundedUp() public {
        uint256 clientBefore = client.balance;
        uint256 spBefore = sp.balance;
        uint256 id = _active();
        vm.warp(T0 + 1_000);
        vm.prank(sp);
        m.terminate(id);
        // 1_000_000_001 * 2_600 / 3_600 = 722_222_222.9... rounds up to 722_222_223.
        uint256 slash = 722_222_223;
        vm.expectEmit(true, false, false, true);
        emit OrderSettled(id, ESCROW, COLLATERAL - slash, slash);
        vm.prank(sp);
        m.settle(id);
        assertEq(client.balance, clientBefore + slash, "client gets escrow back plus the slash");
        assertEq(sp.balance, spBefore - slash, "provider loses the slash");
        assertEq(address(m).balance, 0, "nothing left");
    }

    function test_slash_notForClientTerminationOrExpiry() public {
        assertEq(_slashAfter(COLLATERAL, 1_000, false), 0, "client terminated");
        assertEq(_slashAfter(0, 1_000, true), 0, "no collateral");
        assertEq(_slashAfter(COLLATERAL, 0, true), COLLATERAL, "all unserved");
        // Natural expiry: the whole collateral comes back.
        uint256 id = _active();
        vm.warp(block.timestamp + MAX_DURATION);
        vm.expectEmit(true, false, false, true);
        emit OrderSettled(id, ESCROW, COLLATERAL, 0);
        vm.prank(sp);
        m.settle(id);
    }

    /// Runs an order with `collateral` to a termination `elapsed` seconds after acceptance (by the
    /// provider or the client), settles it, and returns the collateral the provider lost.
    function _slashAfter(uint256 collateral, uint64 elapsed, bool byProvider) internal returns (uint256) {
        Marketplace.Terms memory terms = _terms();
        terms.collateral = collateral;
        uint256 id = _createWith(terms, ESCROW);
        vm.prank(sp);
        m.accept{value: collateral}(id);
        vm.warp(block.timestamp + elapsed);
        vm.prank(byProvider ? sp : client);
        m.terminate(id);
        uint256 before = sp.balance;
        vm.prank(sp);
        m.settle(id);
        return collateral - (sp.balance - before);
    }

    function testFuzz_noWeiLeaksWhateverTheCourse(
        uint96 escrow,
        uint96 collateral,
        uint32 elapsed,
        uint64 secs,
        uint64 bytesMoved,
        bool providerEnds,
        uint96 topUp
    ) public {
        escrow = uint96(bound(escrow, 1, 100 ether));
        collateral = uint96(bound(collateral, 0, 100 ether));
        elapsed = uint32(bound(elapsed, 0, MAX_DURATION - 1));
        topUp = uint96(bound(topUp, 0, 10 ether));
        uint256 sum = _sumOfBalances();

        Marketplace.Terms memory terms = _terms();
        terms.collateral = collateral;
        // Bytes up to the allowance need no acknowledgment; any u64 total fits this one.
        terms.byteAllowance = type(uint64).max;
        uint256 id = _createWith(terms, escrow);
        _accept(id);
        if (topUp > 0) {
            vm.prank(client);
            m.topUp{value: topUp}(id);
        }
        vm.warp(T0 + elapsed);
        vm.prank(providerEnds ? sp : client);
        m.terminate(id);
        secs = uint64(bound(secs, 0, elapsed));
        if (_price(secs, bytesMoved) <= m.getOrder(id).escrow && (secs > 0 || bytesMoved > 0)) {
            _claim(id, _head(1), secs, bytesMoved, 0);
        }
        vm.prank(sp);
        m.settle(id);

        assertEq(address(m).balance, 0, "contract empty");
        assertEq(_sumOfBalances(), sum, "sum of balances unchanged");
    }

    function test_deferredPayment_aRefusingClientCannotBlockTheProvider() public {
        StubbornClient stubborn = new StubbornClient{value: 10 ether}(m);
        Marketplace.Terms memory terms = _terms();
        uint256 id = stubborn.order(sp, terms, ESCROW);
        _accept(id);
        vm.warp(T0 + 10);
        stubborn.terminate(id);
        uint256 spBefore = sp.balance;
        vm.expectEmit(true, false, false, true);
        emit PaymentDeferred(address(stubborn), ESCROW);
        vm.prank(sp);
        m.settle(id);
        assertEq(sp.balance, spBefore + COLLATERAL, "provider got its collateral");
        assertEq(m.owed(address(stubborn)), ESCROW, "refund kept for the client");

        stubborn.setRefuse(false);
        uint256 before = address(stubborn).balance;
        stubborn.withdraw();
        assertEq(address(stubborn).balance, before + ESCROW, "pulled");
        assertEq(m.owed(address(stubborn)), 0, "nothing owed");
        assertEq(address(m).balance, 0, "contract empty");

        vm.expectRevert(abi.encodeWithSelector(Marketplace.NothingOwed.selector, address(stubborn)));
        stubborn.withdraw();
    }

    function test_deferredPayment_withdrawFailsWhileTheReceiverStillRefuses() public {
        StubbornClient stubborn = new StubbornClient{value: 10 ether}(m);
        Marketplace.Terms memory terms = _terms();
        uint256 id = stubborn.order(sp, terms, ESCROW);
        vm.prank(sp);
        m.cancel(id);
        assertEq(m.owed(address(stubborn)), ESCROW, "refund owed");
        vm.expectRevert(abi.encodeWithSelector(Marketplace.TransferFailed.selector, address(stubborn), ESCROW));
        stubborn.withdraw();
        assertEq(m.owed(address(stubborn)), ESCROW, "still owed after the failed pull");
    }
}
