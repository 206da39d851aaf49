// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {MarketplaceBase} from "./MarketplaceBase.sol";
import {Marketplace} from "../src/Marketplace.sol";
import {ProviderRegistry} from "../src/ProviderRegistry.sol";
import {Party} from "./Party.sol";

/// Payments to receivers that misbehave never block the other party: `settle`, `claim` and
/// `cancel` succeed within an ordinary gas limit and defer the payment to `owed`; `withdraw`
/// copies no return data either.
contract ReceiversTest is MarketplaceBase {
    event PaymentDeferred(address indexed to, uint256 amount);

    /// An ordinary gas limit for one call: with the old push (all gas forwarded, return data
    /// copied) a 1 MiB return bomb alone needs about 2.2M gas and a gas burner takes 63/64.
    uint256 constant GAS_LIMIT = 400_000;

    Party internal party;

    function setUp() public override {
        super.setUp();
        party = new Party();
        vm.deal(address(party), 1_000 ether);
    }

    function _partyOrder() internal returns (uint256 id) {
        bytes memory ret = party.exec(address(m), ESCROW, abi.encodeCall(Marketplace.createOrder, (sp, _terms())));
        id = abi.decode(ret, (uint256));
    }

    function _partyProvider() internal {
        ProviderRegistry.Dataset[] memory ds = new ProviderRegistry.Dataset[](0);
        party.exec(
            address(reg),
            0,
            abi.encodeCall(ProviderRegistry.registerProvider, ("party.example:22", HOST_KEY, _offer(), ds))
        );
    }

    function _orderWithParty() internal returns (uint256 id) {
        _partyProvider();
        Marketplace.Terms memory terms = _terms();
        terms.datasetId = "";
        vm.prank(client);
        id = m.createOrder{value: ESCROW}(address(party), terms);
        party.exec(address(m), COLLATERAL, abi.encodeCall(Marketplace.accept, (id)));
    }

    // ------------------------------------------------------------ the client misbehaves

    function _clientCannotBlockSettle(Party.Mode mode) internal {
        uint256 id = _partyOrder();
        _accept(id);
        vm.warp(T0 + 10);
        party.exec(address(m), 0, abi.encodeCall(Marketplace.terminate, (id)));
        party.setMode(mode);
        uint256 spBefore = sp.balance;
        vm.expectEmit(true, false, false, true);
        emit PaymentDeferred(address(party), ESCROW);
        vm.prank(sp);
        m.settle{gas: GAS_LIMIT}(id);
        assertEq(sp.balance, spBefore + COLLATERAL, "provider got its collateral");
        assertEq(m.owed(address(party)), ESCROW, "the client's refund waits for it");
        assertTrue(m.getOrder(id).settled, "settled");
    }

    function test_settle_aReturnBombClientCannotBlockTheProvider() public {
        _clientCannotBlockSettle(Party.Mode.ReturnBomb);
    }

    function test_settle_aGasBurningClientCannotBlockTheProvider() public {
        _clientCannotBlockSettle(Party.Mode.BurnGas);
    }

    function test_cancel_aReturnBombOrGasBurningClientCannotBlockTheDecline() public {
        party.setMode(Party.Mode.ReturnBomb);
        uint256 a = _partyOrder();
        vm.prank(sp);
        m.cancel{gas: GAS_LIMIT}(a);
        party.setMode(Party.Mode.BurnGas);
        uint256 b = _partyOrder();
        vm.prank(sp);
        m.cancel{gas: GAS_LIMIT}(b);
        assertEq(m.owed(address(party)), 2 * ESCROW, "both refunds wait");
    }

    // ------------------------------------------------------------ the provider misbehaves

    function _providerCannotBlockSettle(Party.Mode mode) internal {
        uint256 id = _orderWithParty();
        vm.warp(T0 + 10);
        vm.prank(client);
        m.terminate(id);
        party.setMode(mode);
        vm.warp(T0 + 10 + CLAIM_WINDOW);
        uint256 clientBefore = client.balance;
        vm.expectEmit(true, false, false, true);
        emit PaymentDeferred(address(party), COLLATERAL);
        vm.prank(client);
        m.settle{gas: GAS_LIMIT}(id);
        assertEq(client.balance, clientBefore + ESCROW, "client got its refund");
        assertEq(m.owed(address(party)), COLLATERAL, "the provider's collateral waits for it");
    }

    function test_settle_aReturnBombProviderCannotBlockTheClient() public {
        _providerCannotBlockSettle(Party.Mode.ReturnBomb);
    }

    function test_settle_aGasBurningProviderCannotBlockTheClient() public {
        _providerCannotBlockSettle(Party.Mode.BurnGas);
    }

    function test_claim_aProviderThatCannotTakeThePaymentStillGetsItsClaimRecorded() public {
        uint256 id = _orderWithParty();
        vm.warp(T0 + 20);
        party.setMode(Party.Mode.ReturnBomb);
        bytes memory proof = _proof(id, _head(1), 10, 0, 0);
        party.exec{gas: GAS_LIMIT}(
            address(m), 0, abi.encodeCall(Marketplace.claim, (id, CAP, _head(1), 10, 0, 0, proof))
        );
        party.setMode(Party.Mode.BurnGas);
        proof = _proof(id, _head(2), 10, 0, 0);
        party.exec{gas: GAS_LIMIT}(
            address(m), 0, abi.encodeCall(Marketplace.claim, (id, CAP, _head(2), 10, 0, 0, proof))
        );
        assertEq(m.getOrder(id).claimedSeconds, 20, "both claims landed");
        assertEq(m.owed(address(party)), 20 * PPS, "and their amounts wait for the provider");
    }

    // ------------------------------------------------------------ withdraw

    function test_withdraw_aReturnBombPaysForItsOwnBlobAndIsPaid() public {
        _clientCannotBlockSettle(Party.Mode.ReturnBomb);
        uint256 before = address(party).balance;
        // withdraw forwards the caller's gas and copies nothing: the blob costs the receiver only.
        party.exec{gas: 5_000_000}(address(m), 0, abi.encodeCall(Marketplace.withdraw, ()));
        assertEq(address(party).balance, before + ESCROW, "pulled");
        assertEq(m.owed(address(party)), 0, "nothing owed");
    }

    function test_withdraw_aGasBurnerOnlyFailsItsOwnPull() public {
        _clientCannotBlockSettle(Party.Mode.BurnGas);
        vm.expectRevert(abi.encodeWithSelector(Marketplace.TransferFailed.selector, address(party), ESCROW));
        party.exec{gas: 1_000_000}(address(m), 0, abi.encodeCall(Marketplace.withdraw, ()));
        assertEq(m.owed(address(party)), ESCROW, "still owed");
        party.setMode(Party.Mode.Accept);
        party.exec(address(m), 0, abi.encodeCall(Marketplace.withdraw, ()));
        assertEq(m.owed(address(party)), 0, "pulled once it behaves");
        assertEq(address(m).balance, 0, "contract empty");
    }
}
