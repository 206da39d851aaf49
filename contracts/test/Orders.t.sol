// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {MarketplaceBase} from "./MarketplaceBase.sol";
import {Marketplace} from "../src/Marketplace.sol";
import {ProviderRegistry} from "../src/ProviderRegistry.sol";
import {ITickVerifier} from "../src/ITickVerifier.sol";

/// Creation, acceptance, cancellation, top-up, termination and expiry of orders.
contract OrdersTest is MarketplaceBase {
    event OrderCreated(
        uint256 indexed orderId,
        address indexed client,
        address indexed provider,
        uint256 escrow,
        uint256 collateral,
        string datasetId
    );
    event OrderAccepted(uint256 indexed orderId, address indexed provider, uint256 collateral, uint64 expiresAt);
    event OrderCancelled(uint256 indexed orderId, address indexed by, uint256 refund);
    event OrderDeclined(uint256 indexed orderId, string reason);
    event OrderToppedUp(uint256 indexed orderId, uint256 amount, uint256 escrow);
    event OrderTerminated(uint256 indexed orderId, address indexed by, uint64 endedAt);

    uint256 constant PENDING = 0;
    uint256 constant ACTIVE = 1;
    uint256 constant ENDED = 2;
    uint256 constant CANCELLED = 3;

    // ------------------------------------------------------------ create

    function test_createOrder_storesTheTermsAndHoldsTheEscrow() public {
        uint256 before = client.balance;
        uint256 id = _create();
        assertEq(id, 1, "ids start at 1");
        assertEq(m.orderCount(), 1, "count");
        Marketplace.Order memory o = m.getOrder(id);
        assertEq(o.id, 1, "id");
        assertEq(o.client, client, "client");
        assertEq(o.provider, sp, "provider");
        assertEq(o.terms.keyFingerprint, FINGERPRINT, "fingerprint");
        assertEq(o.terms.cpus, 2, "cpus");
        assertEq(o.terms.memoryMiB, 2048, "memory");
        assertEq(o.terms.diskMiB, 10_240, "disk");
        assertEq(o.terms.datasetId, "era5", "dataset");
        assertEq(o.terms.maxDuration, MAX_DURATION, "duration");
        assertEq(o.escrow, ESCROW, "escrow");
        assertEq(_state(id), PENDING, "pending");
        assertEq(o.createdAt, T0, "created at");
        assertEq(o.acceptedAt, 0, "not accepted");
        assertEq(o.head, bytes32(0), "head starts at 0");
        assertEq(address(m).balance, ESCROW, "contract holds escrow");
        assertEq(client.balance, before - ESCROW, "client paid");
        assertEq(_create(), 2, "ids increment");
    }

    function test_createOrder_storesTheAckSignerAndTheByteAllowance() public {
        uint256 id = _create();
        Marketplace.Order memory o = m.getOrder(id);
        assertEq(o.terms.ackSigner, vm.addr(ACK_KEY), "ack signer");
        assertEq(o.terms.byteAllowance, BYTE_ALLOWANCE, "allowance");
        assertEq(o.ackedBytes, 0, "nothing acknowledged yet");
        assertEq(o.ackedHead, bytes32(0), "no acknowledged head");
        assertEq(_claimableBytes(id), BYTE_ALLOWANCE, "the allowance is claimable");

        // No ack key and no allowance: the order pays for seconds only.
        Marketplace.Terms memory terms = _terms();
        terms.ackSigner = address(0);
        terms.byteAllowance = 0;
        uint256 bare = _createWith(terms, ESCROW);
        assertEq(m.getOrder(bare).terms.ackSigner, address(0), "no ack signer");
        assertEq(_claimableBytes(bare), 0, "no bytes");
    }

    function test_createOrder_refusesSelfOrders() public {
        Marketplace.Terms memory terms = _terms();
        vm.expectRevert(abi.encodeWithSelector(Marketplace.SelfOrder.selector, sp));
        vm.prank(sp);
        m.createOrder{value: ESCROW}(sp, terms);
    }

    function test_createOrder_refusesAZeroAcceptTimeout() public {
        // It could never be accepted: accept needs a moment before createdAt + acceptTimeout.
        Marketplace.Terms memory terms = _terms();
        terms.acceptTimeout = 0;
        vm.expectRevert(Marketplace.ZeroAcceptTimeout.selector);
        _createWith(terms, ESCROW);
    }

    function test_createOrder_refusesPricesAboveTheMeterBound() public {
        uint256 max = MAX_PRICE;
        assertEq(max, type(uint128).max, "the meter's MAX_PRICE, 2^128 - 1");
        Marketplace.Terms memory terms = _terms();
        terms.pricePerSecond = max + 1;
        vm.expectRevert(abi.encodeWithSelector(Marketplace.PriceTooHigh.selector, max + 1, max));
        _createWith(terms, ESCROW);
        terms = _terms();
        terms.pricePerGiB = type(uint256).max;
        vm.expectRevert(abi.encodeWithSelector(Marketplace.PriceTooHigh.selector, type(uint256).max, max));
        _createWith(terms, ESCROW);

        // At the bound the prices are kept whole (storage holds them in 128 bits).
        terms = _terms();
        terms.pricePerSecond = max;
        terms.pricePerGiB = max;
        Marketplace.Order memory o = m.getOrder(_createWith(terms, ESCROW));
        assertEq(o.terms.pricePerSecond, max, "price per second stored whole");
        assertEq(o.terms.pricePerGiB, max, "price per GiB stored whole");
    }

    function test_constructor_takesTheClaimWindow() public {
        assertEq(m.CLAIM_WINDOW(), CLAIM_WINDOW, "the fixture's window");
        uint32[] memory caps = new uint32[](1);
        caps[0] = CAP;
        ITickVerifier[] memory vs = new ITickVerifier[](1);
        vs[0] = verifier;
        Marketplace short = new Marketplace(caps, vs, 1 hours);
        assertEq(short.CLAIM_WINDOW(), 1 hours, "an hour");
        vm.expectRevert(abi.encodeWithSelector(Marketplace.InvalidClaimWindow.selector, 0));
        new Marketplace(caps, vs, 0);
        uint64 tooLong = MAX_DURATION_LIMIT + 1;
        vm.expectRevert(abi.encodeWithSelector(Marketplace.InvalidClaimWindow.selector, tooLong));
        new Marketplace(caps, vs, tooLong);
    }

    function test_createOrder_emitsOrderCreated() public {
        Marketplace.Terms memory terms = _terms();
        vm.expectEmit(true, true, true, true);
        emit OrderCreated(1, client, sp, ESCROW, COLLATERAL, "era5");
        _createWith(terms, ESCROW);
    }

    function test_createOrder_withoutDatasetIsAllowed() public {
        Marketplace.Terms memory terms = _terms();
        terms.datasetId = "";
        uint256 id = _createWith(terms, ESCROW);
        assertEq(m.getOrder(id).terms.datasetId, "", "no dataset");
    }

    function test_createOrder_refusesBadRequests() public {
        Marketplace.Terms memory terms = _terms();
        vm.expectRevert(Marketplace.ZeroEscrow.selector);
        _createWith(terms, 0);

        terms.maxDuration = 0;
        vm.expectRevert(Marketplace.ZeroDuration.selector);
        _createWith(terms, ESCROW);

        terms.maxDuration = MAX_DURATION_LIMIT + 1;
        vm.expectRevert(
            abi.encodeWithSelector(Marketplace.DurationTooLong.selector, terms.maxDuration, MAX_DURATION_LIMIT)
        );
        _createWith(terms, ESCROW);

        terms = _terms();
        terms.acceptTimeout = type(uint64).max;
        vm.expectRevert(
            abi.encodeWithSelector(Marketplace.DurationTooLong.selector, type(uint64).max, MAX_DURATION_LIMIT)
        );
        _createWith(terms, ESCROW);

        terms = _terms();
        terms.keyFingerprint = bytes32(0);
        vm.expectRevert(Marketplace.ZeroFingerprint.selector);
        _createWith(terms, ESCROW);

        terms = _terms();
        terms.datasetId = "unknown";
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.UnknownDataset.selector, sp, "unknown"));
        _createWith(terms, ESCROW);

        terms = _terms();
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.ProviderNotFound.selector, stranger));
        vm.prank(client);
        m.createOrder{value: ESCROW}(stranger, terms);
    }

    function test_createOrder_refusesADiskBelowTheMinimum() public {
        Marketplace.Terms memory terms = _terms();
        terms.diskMiB = 0;
        vm.expectRevert(abi.encodeWithSelector(Marketplace.DiskTooSmall.selector, 0, 32));
        _createWith(terms, ESCROW);
        terms.diskMiB = 31;
        vm.expectRevert(abi.encodeWithSelector(Marketplace.DiskTooSmall.selector, 31, 32));
        _createWith(terms, ESCROW);
        terms.diskMiB = m.MIN_DISK_MIB();
        uint256 id = _createWith(terms, ESCROW);
        assertEq(m.getOrder(id).terms.diskMiB, 32, "the minimum itself is allowed");
    }

    function test_createOrder_refusesMoreDiskThanTheOfferAllows() public {
        Marketplace.Terms memory terms = _terms();
        terms.diskMiB = MAX_DISK;
        uint256 id = _createWith(terms, ESCROW);
        assertEq(m.getOrder(id).terms.diskMiB, MAX_DISK, "the maximum itself is allowed");

        terms.diskMiB = MAX_DISK + 1;
        vm.expectRevert(abi.encodeWithSelector(Marketplace.DiskTooLarge.selector, MAX_DISK + 1, MAX_DISK));
        _createWith(terms, ESCROW);

        terms.diskMiB = type(uint64).max;
        vm.expectRevert(abi.encodeWithSelector(Marketplace.DiskTooLarge.selector, type(uint64).max, MAX_DISK));
        _createWith(terms, ESCROW);
    }

    function test_createOrder_checksTheDiskAgainstTheOfferOfTheMoment() public {
        uint256 before = _create();
        ProviderRegistry.Offer memory offer = _offer();
        offer.diskMiB = 1_024;
        offer.maxDiskMiB = 4_096;
        vm.prank(sp);
        reg.updateProvider("sp.example:2222", HOST_KEY, offer);

        assertEq(m.getOrder(before).terms.diskMiB, 10_240, "an existing order keeps its disk");
        Marketplace.Terms memory terms = _terms();
        vm.expectRevert(abi.encodeWithSelector(Marketplace.DiskTooLarge.selector, 10_240, 4_096));
        _createWith(terms, ESCROW);
        terms.diskMiB = 4_096;
        _createWith(terms, ESCROW);
    }

    function test_getOrder_refusesUnknownIds() public {
        vm.expectRevert(abi.encodeWithSelector(Marketplace.OrderNotFound.selector, 0));
        m.getOrder(0);
        vm.expectRevert(abi.encodeWithSelector(Marketplace.OrderNotFound.selector, 7));
        m.getOrder(7);
    }

    // ------------------------------------------------------------ accept

    function test_accept_postsCollateralAndStartsTheLease() public {
        uint256 id = _create();
        vm.warp(T0 + 30);
        vm.expectEmit(true, true, false, true);
        emit OrderAccepted(id, sp, COLLATERAL, uint64(T0 + 30 + MAX_DURATION));
        _accept(id);
        Marketplace.Order memory o = m.getOrder(id);
        assertEq(_state(id), ACTIVE, "active");
        assertEq(o.acceptedAt, T0 + 30, "accepted at");
        assertEq(o.acceptedAt + o.terms.maxDuration, T0 + 30 + MAX_DURATION, "expires at");
        assertEq(address(m).balance, ESCROW + COLLATERAL, "contract holds both");
    }

    function test_accept_refusesWrongCallerWrongCollateralAndWrongState() public {
        uint256 id = _create();
        vm.expectRevert(abi.encodeWithSelector(Marketplace.NotProvider.selector, id, stranger));
        vm.prank(stranger);
        m.accept{value: COLLATERAL}(id);

        vm.expectRevert(abi.encodeWithSelector(Marketplace.WrongCollateral.selector, id, COLLATERAL, COLLATERAL - 1));
        vm.prank(sp);
        m.accept{value: COLLATERAL - 1}(id);

        vm.expectRevert(abi.encodeWithSelector(Marketplace.WrongCollateral.selector, id, COLLATERAL, COLLATERAL + 1));
        vm.prank(sp);
        m.accept{value: COLLATERAL + 1}(id);

        _accept(id);
        vm.expectRevert(abi.encodeWithSelector(Marketplace.OrderNotPending.selector, id, Marketplace.OrderState.Active));
        vm.prank(sp);
        m.accept{value: COLLATERAL}(id);
    }

    function test_accept_afterTheAcceptTimeoutIsRefused() public {
        uint256 id = _create();
        uint64 deadline = uint64(T0 + ACCEPT_TIMEOUT);
        vm.warp(deadline);
        // From this second on the client may cancel, so the provider may no longer accept.
        vm.expectRevert(abi.encodeWithSelector(Marketplace.AcceptTimeoutPassed.selector, id, deadline));
        vm.prank(sp);
        m.accept{value: COLLATERAL}(id);
        vm.prank(client);
        m.cancel(id);

        uint256 id2 = _create();
        vm.warp(deadline + ACCEPT_TIMEOUT - 1);
        _accept(id2);
        assertEq(_state(id2), ACTIVE, "accepted in its last second");
    }

    function test_accept_withZeroCollateralOrder() public {
        Marketplace.Terms memory terms = _terms();
        terms.collateral = 0;
        uint256 id = _createWith(terms, ESCROW);
        vm.prank(sp);
        m.accept(id);
        assertEq(_state(id), ACTIVE, "active");
    }

    // ------------------------------------------------------------ cancel

    function test_cancel_byClientAfterTheTimeoutRefundsEverything() public {
        uint256 before = client.balance;
        uint256 id = _create();
        vm.warp(T0 + ACCEPT_TIMEOUT);
        vm.expectEmit(true, true, false, true);
        emit OrderCancelled(id, client, ESCROW);
        vm.prank(client);
        m.cancel(id);
        assertEq(client.balance, before, "full refund");
        assertEq(address(m).balance, 0, "nothing left");
        Marketplace.Order memory o = m.getOrder(id);
        assertEq(_state(id), CANCELLED, "cancelled");
        assertEq(o.escrow, 0, "escrow emptied");
        assertEq(o.endedBy, client, "by client");
        assertTrue(o.settled, "settled");
    }

    function test_cancel_byClientBeforeTheTimeoutIsRefused() public {
        uint256 id = _create();
        vm.warp(T0 + ACCEPT_TIMEOUT - 1);
        vm.expectRevert(
            abi.encodeWithSelector(Marketplace.AcceptTimeoutNotReached.selector, id, uint64(T0 + ACCEPT_TIMEOUT))
        );
        vm.prank(client);
        m.cancel(id);
    }

    function test_cancel_byProviderDeclinesAtAnyTime() public {
        uint256 before = client.balance;
        uint256 id = _create();
        vm.prank(sp);
        m.cancel(id);
        assertEq(client.balance, before, "full refund");
        assertEq(_state(id), CANCELLED, "cancelled");
    }

    function test_decline_refundsLikeAProvidersCancelAndSaysWhy() public {
        uint256 before = client.balance;
        uint256 id = _create();
        vm.expectEmit(true, false, false, true);
        emit OrderDeclined(id, "no GPU free until Friday");
        vm.expectEmit(true, true, false, true);
        emit OrderCancelled(id, sp, ESCROW);
        vm.prank(sp);
        m.decline(id, "no GPU free until Friday");
        assertEq(client.balance, before, "full refund");
        assertEq(address(m).balance, 0, "nothing left");
        Marketplace.Order memory o = m.getOrder(id);
        assertEq(_state(id), CANCELLED, "cancelled");
        assertEq(o.escrow, 0, "escrow paid out");
        assertEq(o.endedBy, sp, "ended by the provider");
        assertEq(o.endedAt, T0, "ended now");
        assertTrue(o.settled, "books closed");
    }

    function test_decline_onlyByTheProviderOfAPendingOrder() public {
        uint256 id = _create();
        vm.expectRevert(abi.encodeWithSelector(Marketplace.NotProvider.selector, id, client));
        vm.prank(client);
        m.decline(id, "");
        vm.expectRevert(abi.encodeWithSelector(Marketplace.NotProvider.selector, id, stranger));
        vm.prank(stranger);
        m.decline(id, "");
        vm.expectRevert(abi.encodeWithSelector(Marketplace.OrderNotFound.selector, 99));
        vm.prank(sp);
        m.decline(99, "");

        _accept(id);
        vm.expectRevert(abi.encodeWithSelector(Marketplace.OrderNotPending.selector, id, Marketplace.OrderState.Active));
        vm.prank(sp);
        m.decline(id, "too late");

        uint256 declined = _create();
        vm.prank(sp);
        m.decline(declined, "");
        vm.expectRevert(
            abi.encodeWithSelector(Marketplace.OrderNotPending.selector, declined, Marketplace.OrderState.Cancelled)
        );
        vm.prank(sp);
        m.decline(declined, "twice");
    }

    function test_decline_reasonIsCappedAt200Bytes() public {
        uint256 id = _create();
        bytes memory longest = new bytes(200);
        for (uint256 i = 0; i < longest.length; i++) {
            longest[i] = "x";
        }
        bytes memory tooLong = bytes.concat(longest, "x");
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.TooLong.selector, "reason", 201, 200));
        vm.prank(sp);
        m.decline(id, string(tooLong));
        assertEq(_state(id), PENDING, "still pending");
        vm.prank(sp);
        m.decline(id, string(longest));
        assertEq(_state(id), CANCELLED, "declined with the longest reason");
    }

    function test_cancel_refusesStrangersAndNonPendingOrders() public {
        uint256 id = _create();
        vm.expectRevert(abi.encodeWithSelector(Marketplace.NotParty.selector, id, stranger));
        vm.prank(stranger);
        m.cancel(id);

        _accept(id);
        vm.warp(T0 + ACCEPT_TIMEOUT);
        vm.expectRevert(abi.encodeWithSelector(Marketplace.OrderNotPending.selector, id, Marketplace.OrderState.Active));
        vm.prank(client);
        m.cancel(id);

        uint256 id2 = _create();
        vm.prank(sp);
        m.cancel(id2);
        vm.expectRevert(
            abi.encodeWithSelector(Marketplace.OrderNotPending.selector, id2, Marketplace.OrderState.Cancelled)
        );
        vm.prank(sp);
        m.cancel(id2);
        vm.expectRevert(
            abi.encodeWithSelector(Marketplace.OrderNotPending.selector, id2, Marketplace.OrderState.Cancelled)
        );
        vm.prank(sp);
        m.accept{value: COLLATERAL}(id2);
    }

    // ------------------------------------------------------------ top-up

    function test_topUp_addsEscrowToPendingAndActiveOrders() public {
        uint256 id = _create();
        vm.expectEmit(true, false, false, true);
        emit OrderToppedUp(id, 3, ESCROW + 3);
        vm.prank(client);
        m.topUp{value: 3}(id);
        _accept(id);
        vm.prank(client);
        m.topUp{value: 5}(id);
        assertEq(m.getOrder(id).escrow, ESCROW + 8, "escrow grew");
        assertEq(address(m).balance, ESCROW + 8 + COLLATERAL, "held");
    }

    function test_topUp_refusesStrangersZeroAndEndedOrders() public {
        uint256 id = _active();
        vm.expectRevert(abi.encodeWithSelector(Marketplace.NotClient.selector, id, stranger));
        vm.prank(stranger);
        m.topUp{value: 1}(id);

        vm.expectRevert(Marketplace.ZeroAmount.selector);
        vm.prank(client);
        m.topUp(id);

        vm.warp(T0 + MAX_DURATION);
        vm.expectRevert(abi.encodeWithSelector(Marketplace.OrderNotActive.selector, id, Marketplace.OrderState.Ended));
        vm.prank(client);
        m.topUp{value: 1}(id);
    }

    // ------------------------------------------------------------ terminate and expire

    function test_terminate_byClientEndsTheLease() public {
        uint256 id = _active();
        vm.warp(T0 + 100);
        vm.expectEmit(true, true, false, true);
        emit OrderTerminated(id, client, uint64(T0 + 100));
        vm.prank(client);
        m.terminate(id);
        Marketplace.Order memory o = m.getOrder(id);
        assertEq(_state(id), ENDED, "ended");
        assertEq(o.endedAt, T0 + 100, "ended at");
        assertEq(o.endedBy, client, "by client");
    }

    function test_terminate_byProviderEndsTheLease() public {
        uint256 id = _active();
        vm.prank(sp);
        m.terminate(id);
        assertEq(_state(id), ENDED, "ended");
        assertEq(m.getOrder(id).endedBy, sp, "by provider");
    }

    function test_terminate_raceLeavesTheFirstTerminationStanding() public {
        uint256 id = _active();
        vm.warp(T0 + 5);
        vm.prank(sp);
        m.terminate(id);
        // The client's termination lands in the same block, after the provider's.
        vm.expectRevert(abi.encodeWithSelector(Marketplace.OrderNotActive.selector, id, Marketplace.OrderState.Ended));
        vm.prank(client);
        m.terminate(id);
        assertEq(m.getOrder(id).endedBy, sp, "provider's stands");
    }

    function test_terminate_refusesStrangersPendingAndExpiredOrders() public {
        uint256 id = _create();
        vm.expectRevert(abi.encodeWithSelector(Marketplace.OrderNotActive.selector, id, Marketplace.OrderState.Pending));
        vm.prank(client);
        m.terminate(id);

        _accept(id);
        vm.expectRevert(abi.encodeWithSelector(Marketplace.NotParty.selector, id, stranger));
        vm.prank(stranger);
        m.terminate(id);

        vm.warp(T0 + MAX_DURATION);
        vm.expectRevert(abi.encodeWithSelector(Marketplace.OrderNotActive.selector, id, Marketplace.OrderState.Ended));
        vm.prank(sp);
        m.terminate(id);
    }

    function test_expiry_readsAsEndedAtTheExpirySecond() public {
        uint256 id = _active();
        vm.warp(T0 + MAX_DURATION - 1);
        assertEq(_state(id), ACTIVE, "live one second before");
        vm.warp(T0 + MAX_DURATION);
        assertEq(_state(id), ENDED, "ended at expiry");
        Marketplace.Order memory o = m.getOrder(id);
        assertEq(uint256(o.state), ENDED, "getOrder agrees");
        assertEq(o.endedAt, T0 + MAX_DURATION, "ended at expiry time");
        assertEq(o.endedBy, address(0), "nobody ended it");
    }
}
