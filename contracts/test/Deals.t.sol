// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {MarketplaceBase} from "./MarketplaceBase.sol";
import {CallActorByIdDouble, FilecoinActorDouble} from "./FilecoinActorsDouble.sol";
import {ProviderRegistry} from "../src/ProviderRegistry.sol";
import {FilecoinDeals} from "../src/FilecoinDeals.sol";

/// Datasets that name a Filecoin deal, checked against the storage market through the
/// `call_actor_id` precompile: here its double and actor doubles, installed at their addresses.
contract DealsTest is MarketplaceBase {
    address internal constant CALL_ACTOR_ID = 0xfe00000000000000000000000000000000000005;
    FilecoinActorDouble internal constant MARKET = FilecoinActorDouble(0xff00000000000000000000000000000000000005);
    uint64 internal constant MINER = 1234;
    FilecoinActorDouble internal constant MINER_ACTOR = FilecoinActorDouble(0xFF000000000000000000000000000000000004d2);
    uint64 internal constant OTHER_MINER = 5678;
    uint64 internal constant DEAL = 7_654_321;
    uint64 internal constant PADDED = 34_359_738_368;
    string internal constant PIECE = "baga6ea4seaqao7s73y24kcutaosvacpdjgfe5pw76ooefnyqw4ynr3d2y6x2mpq";
    bytes internal constant PIECE_BYTES =
        hex"0181e203922020077e5fde35c50a9303a55009e3498a4ebedff39c42b710b730d8ec7ac7afa63e";
    /// Another piece: the same CID with its last digest byte changed.
    bytes internal constant OTHER_PIECE_BYTES =
        hex"0181e203922020077e5fde35c50a9303a55009e3498a4ebedff39c42b710b730d8ec7ac7afa63f";

    function setUp() public override {
        super.setUp();
        vm.etch(CALL_ACTOR_ID, address(new CallActorByIdDouble()).code);
        bytes memory actor = address(new FilecoinActorDouble()).code;
        vm.etch(address(MARKET), actor);
        vm.etch(address(MINER_ACTOR), actor);
        MARKET.setDeal(DEAL, PIECE_BYTES, PADDED, MINER);
        MARKET.setDeal(DEAL + 1, OTHER_PIECE_BYTES, PADDED, MINER);
        MARKET.setDeal(DEAL + 2, PIECE_BYTES, PADDED, OTHER_MINER);
        MINER_ACTOR.setController(sp, true);
    }

    function _dealDataset(string memory id, string memory piece, uint64 dealId)
        internal
        pure
        returns (ProviderRegistry.Dataset memory d)
    {
        d = _dataset(id);
        d.pieceCid = piece;
        d.dealId = dealId;
    }

    function _setMiner() internal {
        vm.prank(sp);
        reg.setMiner(MINER);
    }

    function test_setMiner_recordsAMinerTheProviderControls() public {
        vm.expectEmit(true, false, false, true);
        emit ProviderRegistry.MinerSet(sp, MINER);
        _setMiner();
        assertEq(reg.minerOf(sp), MINER, "miner");
    }

    function test_setMiner_refusesAMinerTheProviderDoesNotControl() public {
        MINER_ACTOR.setController(sp, false);
        vm.prank(sp);
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.NotMinerController.selector, sp, MINER));
        reg.setMiner(MINER);
    }

    function test_setMiner_refusesAnActorThatDoesNotExist() public {
        vm.prank(sp);
        vm.expectRevert(
            abi.encodeWithSelector(
                FilecoinDeals.ActorCallFailed.selector, OTHER_MINER, FilecoinDeals.IS_CONTROLLING_ADDRESS, int256(5)
            )
        );
        reg.setMiner(OTHER_MINER);
    }

    function test_addDataset_rightDealIsChecked() public {
        _setMiner();
        vm.expectEmit(true, false, false, true);
        emit ProviderRegistry.DealChecked(sp, "deal", DEAL, MINER, PADDED);
        vm.prank(sp);
        reg.addDataset(_dealDataset("deal", PIECE, DEAL));
        (, ProviderRegistry.Dataset[] memory ds,) = reg.getProvider(sp);
        assertEq(ds[1].dealId, DEAL, "deal id");
        assertEq(ds[1].pieceCid, PIECE, "piece");
    }

    function test_addDataset_aDealAloneFillsInItsPieceCid() public {
        _setMiner();
        vm.prank(sp);
        reg.addDataset(_dealDataset("deal", "", DEAL));
        (, ProviderRegistry.Dataset[] memory ds,) = reg.getProvider(sp);
        assertEq(ds[1].pieceCid, PIECE, "the deal's piece, in text");
    }

    function test_addDataset_wrongPieceIsRefused() public {
        _setMiner();
        // Deal DEAL + 1 stores another piece than the dataset names.
        vm.prank(sp);
        vm.expectRevert(
            abi.encodeWithSelector(
                ProviderRegistry.DealPieceMismatch.selector,
                DEAL + 1,
                PIECE,
                "baga6ea4seaqao7s73y24kcutaosvacpdjgfe5pw76ooefnyqw4ynr3d2y6x2mpy"
            )
        );
        reg.addDataset(_dealDataset("deal", PIECE, DEAL + 1));
    }

    function test_addDataset_dealOfAnotherMinerIsRefused() public {
        _setMiner();
        vm.prank(sp);
        vm.expectRevert(
            abi.encodeWithSelector(ProviderRegistry.DealProviderMismatch.selector, DEAL + 2, MINER, OTHER_MINER)
        );
        reg.addDataset(_dealDataset("deal", PIECE, DEAL + 2));
    }

    function test_addDataset_unknownDealIsRefused() public {
        _setMiner();
        vm.prank(sp);
        vm.expectRevert(
            abi.encodeWithSelector(
                FilecoinDeals.ActorCallFailed.selector, uint64(5), FilecoinDeals.GET_DEAL_PROVIDER, int256(17)
            )
        );
        reg.addDataset(_dealDataset("deal", PIECE, 999));
    }

    function test_addDataset_aDealNeedsAMiner() public {
        vm.prank(sp);
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.NoMiner.selector, sp));
        reg.addDataset(_dealDataset("deal", PIECE, DEAL));
    }

    function test_registerProvider_checksTheDealsItLists() public {
        // A registration's datasets are checked like added ones: a deal needs a miner first.
        vm.prank(sp);
        reg.withdrawProvider();
        ProviderRegistry.Dataset[] memory ds = new ProviderRegistry.Dataset[](1);
        ds[0] = _dealDataset("deal", PIECE, DEAL);
        vm.prank(sp);
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.NoMiner.selector, sp));
        reg.registerProvider("sp.example:2222", HOST_KEY, _offer(), ds);
    }

    function test_addDataset_withoutFilecoinADealCannotBeChecked() public {
        _setMiner();
        vm.etch(CALL_ACTOR_ID, "");
        vm.prank(sp);
        vm.expectRevert(FilecoinDeals.FilecoinUnavailable.selector);
        reg.addDataset(_dealDataset("deal", PIECE, DEAL));
    }

    function test_addDataset_malformedActorAnswersAreRefused() public {
        _setMiner();
        // A byte string where the miner id should be; then a commitment that is not a tagged CID.
        MARKET.setCannedAnswer(FilecoinDeals.GET_DEAL_PROVIDER, hex"4104");
        vm.prank(sp);
        vm.expectRevert(
            abi.encodeWithSelector(
                FilecoinDeals.MalformedActorReturn.selector, uint64(5), FilecoinDeals.GET_DEAL_PROVIDER
            )
        );
        reg.addDataset(_dealDataset("deal", PIECE, DEAL));

        MARKET.setCannedAnswer(FilecoinDeals.GET_DEAL_PROVIDER, "");
        MARKET.setCannedAnswer(FilecoinDeals.GET_DEAL_DATA_COMMITMENT, hex"825820ffff");
        vm.prank(sp);
        vm.expectRevert(
            abi.encodeWithSelector(
                FilecoinDeals.MalformedActorReturn.selector, uint64(5), FilecoinDeals.GET_DEAL_DATA_COMMITMENT
            )
        );
        reg.addDataset(_dealDataset("deal", PIECE, DEAL));

        // A byte string whose length runs past the answer.
        MARKET.setCannedAnswer(FilecoinDeals.GET_DEAL_DATA_COMMITMENT, hex"82d82a58ff00");
        vm.prank(sp);
        vm.expectRevert(
            abi.encodeWithSelector(
                FilecoinDeals.MalformedActorReturn.selector, uint64(5), FilecoinDeals.GET_DEAL_DATA_COMMITMENT
            )
        );
        reg.addDataset(_dealDataset("deal", PIECE, DEAL));
    }

    function test_markVerified_recordsTheTimePerDataset() public {
        assertEq(reg.verifiedAt(sp)[0], 0, "never verified");
        vm.warp(T0 + 100);
        string[] memory ids = new string[](1);
        ids[0] = "era5";
        vm.expectEmit(true, false, false, true);
        emit ProviderRegistry.DatasetVerified(sp, "era5", uint64(T0 + 100));
        vm.prank(sp);
        reg.markVerified(ids);
        assertEq(reg.verifiedAt(sp)[0], T0 + 100, "verified");

        ids[0] = "nope";
        vm.prank(sp);
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.UnknownDataset.selector, sp, "nope"));
        reg.markVerified(ids);

        // A removed dataset added again starts unverified.
        vm.startPrank(sp);
        reg.removeDataset("era5");
        reg.addDataset(_dataset("era5"));
        vm.stopPrank();
        assertEq(reg.verifiedAt(sp)[0], 0, "unverified again");
    }

    function test_addRating_onlyFromTheMarketplace() public {
        vm.prank(stranger);
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.NotMarketplace.selector, stranger));
        reg.addRating(sp, 5, 1 ether);
    }
}
