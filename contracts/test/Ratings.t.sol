// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {MarketplaceBase} from "./MarketplaceBase.sol";
import {Marketplace} from "../src/Marketplace.sol";
import {ProviderRegistry} from "../src/ProviderRegistry.sol";

/// Ratings: once per ended order, by its client, 1 to 5 stars, a short review.
contract RatingsTest is MarketplaceBase {
    event Rated(uint256 indexed orderId, address indexed provider, uint8 stars, string review);

    /// An ended order that paid the provider 10 seconds.
    function _ended() internal returns (uint256 id) {
        id = _active();
        vm.warp(block.timestamp + 10);
        _claim(id, _head(1), 10, 0, 0);
        vm.prank(client);
        m.terminate(id);
    }

    function test_rate_countsAndAveragesInFlooredHundredthsOfEqualWeights() public {
        uint256 a = _ended();
        uint256 b = _ended();
        uint256 c = _ended();
        vm.expectEmit(true, true, false, true);
        emit Rated(a, sp, 5, "fast disks");
        vm.prank(client);
        m.rate(a, 5, "fast disks");
        vm.prank(client);
        m.rate(b, 4, "");
        vm.prank(client);
        m.rate(c, 5, "again");
        (uint64 count, uint256 average) = _rating(sp);
        assertEq(count, 3, "count");
        assertEq(average, 466, "14 / 3 stars = 4.666... reads 466");
        assertTrue(m.getOrder(a).rated, "marked rated");
        assertEq(_provider(sp).ratingSum, 14, "sum");
        assertEq(_provider(sp).ratingWeight, 30 * PPS, "weight: what the three orders paid");
        assertEq(_provider(sp).ratingWeightedStars, 140 * PPS, "stars times wei");
    }

    function test_rate_weighsEachRatingByWhatItsOrderPaid() public {
        // A pays 10 s, B pays 90 s: 5 stars over 10 and 1 star over 90 average 1.4 stars.
        uint256 a = _ended();
        uint256 b = _active();
        vm.warp(block.timestamp + 90);
        _claim(b, _head(1), 90, 0, 0);
        vm.prank(client);
        m.terminate(b);
        vm.prank(client);
        m.rate(a, 5, "");
        vm.prank(client);
        m.rate(b, 1, "");
        (uint64 count, uint256 average) = _rating(sp);
        assertEq(count, 2, "count");
        assertEq(average, 140, "(5 * 10 + 1 * 90) / 100 = 1.40 stars");
        assertEq(_provider(sp).ratingSum, 6, "the plain sum is kept too");
        assertEq(_provider(sp).ratingWeight, 100 * PPS, "weight");
    }

    function test_rate_refusesAnOrderThatPaidNothing() public {
        // A competitor's (or the SP's own sock puppet's) empty order carries no rating.
        uint256 id = _active();
        vm.prank(client);
        m.terminate(id);
        vm.expectRevert(abi.encodeWithSelector(Marketplace.NothingPaid.selector, id));
        vm.prank(client);
        m.rate(id, 1, "never used it");
    }

    function test_rate_withoutRatingsReadsZero() public view {
        (uint64 count, uint256 average) = _rating(sp);
        assertEq(count, 0, "count");
        assertEq(average, 0, "average");
    }

    function test_rate_expiredOrdersCanBeRated() public {
        uint256 id = _active();
        vm.warp(T0 + MAX_DURATION);
        _claim(id, _head(1), 1, 0, 0);
        vm.prank(client);
        m.rate(id, 3, "ok");
        (uint64 count,) = _rating(sp);
        assertEq(count, 1, "counted");
    }

    function test_rate_onlyOncePerOrder() public {
        uint256 id = _ended();
        vm.prank(client);
        m.rate(id, 1, "slow");
        vm.expectRevert(abi.encodeWithSelector(Marketplace.AlreadyRated.selector, id));
        vm.prank(client);
        m.rate(id, 5, "changed my mind");
    }

    function test_rate_refusesOthersThanTheClient() public {
        uint256 id = _ended();
        vm.expectRevert(abi.encodeWithSelector(Marketplace.NotClient.selector, id, sp));
        vm.prank(sp);
        m.rate(id, 5, "self praise");
        vm.expectRevert(abi.encodeWithSelector(Marketplace.NotClient.selector, id, stranger));
        vm.prank(stranger);
        m.rate(id, 1, "");
    }

    function test_rate_refusesOrdersThatHaveNotEnded() public {
        uint256 id = _create();
        vm.expectRevert(abi.encodeWithSelector(Marketplace.OrderNotEnded.selector, id, Marketplace.OrderState.Pending));
        vm.prank(client);
        m.rate(id, 5, "");
        _accept(id);
        vm.expectRevert(abi.encodeWithSelector(Marketplace.OrderNotEnded.selector, id, Marketplace.OrderState.Active));
        vm.prank(client);
        m.rate(id, 5, "");

        uint256 cancelled = _create();
        vm.prank(sp);
        m.cancel(cancelled);
        vm.expectRevert(
            abi.encodeWithSelector(Marketplace.OrderNotEnded.selector, cancelled, Marketplace.OrderState.Cancelled)
        );
        vm.prank(client);
        m.rate(cancelled, 1, "never served");
    }

    function test_rate_refusesStarsOutsideOneToFiveAndLongReviews() public {
        uint256 id = _ended();
        vm.expectRevert(abi.encodeWithSelector(Marketplace.InvalidStars.selector, 0));
        vm.prank(client);
        m.rate(id, 0, "");
        vm.expectRevert(abi.encodeWithSelector(Marketplace.InvalidStars.selector, 6));
        vm.prank(client);
        m.rate(id, 6, "");
        bytes memory long = new bytes(281);
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.TooLong.selector, "review", 281, 280));
        vm.prank(client);
        m.rate(id, 4, string(long));
        vm.prank(client);
        m.rate(id, 4, string(new bytes(280)));
    }
}
