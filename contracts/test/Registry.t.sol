// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {MarketplaceBase} from "./MarketplaceBase.sol";
import {TestTickVerifier} from "./TestTickVerifier.sol";
import {Marketplace} from "../src/Marketplace.sol";
import {ProviderRegistry} from "../src/ProviderRegistry.sol";
import {ITickVerifier} from "../src/ITickVerifier.sol";

contract RegistryTest is MarketplaceBase {
    event ProviderRegistered(address indexed provider, string endpoint, string sshHostKey);
    event ProviderUpdated(address indexed provider, string endpoint, string sshHostKey);
    event ProviderWithdrawn(address indexed provider);
    event DatasetAdded(address indexed provider, string datasetId);
    event DatasetRemoved(address indexed provider, string datasetId);

    function test_registerProvider_storesTheEntryAndListsIt() public view {
        ProviderRegistry.Provider memory p = _provider(sp);
        assertEq(p.owner, sp, "owner");
        assertEq(p.endpoint, "sp.example:2222", "endpoint");
        assertEq(p.sshHostKey, HOST_KEY, "host key");
        assertEq(p.offer.cpus, 8, "cpus");
        assertEq(p.offer.memoryMiB, 32_768, "memory");
        assertEq(p.offer.diskMiB, DISK, "disk");
        assertEq(p.offer.maxDiskMiB, MAX_DISK, "max disk");
        assertEq(p.offer.gpuModel, "NVIDIA L4", "gpu model");
        assertEq(p.offer.gpuCount, 1, "gpu count");
        assertEq(p.offer.pricePerSecond, PPS, "price per second");
        assertEq(p.offer.pricePerGiB, PPG, "price per GiB");
        assertTrue(p.active, "active");
        assertEq(p.registeredAt, T0, "registered at");
        address[] memory all = reg.providerAddresses();
        assertEq(all.length, 1, "one provider");
        assertEq(all[0], sp, "listed");
        ProviderRegistry.Dataset[] memory ds = _datasets(sp);
        assertEq(ds.length, 1, "one dataset");
        assertEq(ds[0].id, "era5", "dataset id");
        assertEq(ds[0].dealId, 0, "no deal: the provider's word alone");
        assertEq(_findDataset(sp, "era5").sizeBytes, 34_359_738_368, "size");
    }

    function test_registerProvider_emitsRegisteredAndDatasetAdded() public {
        ProviderRegistry.Dataset[] memory ds = new ProviderRegistry.Dataset[](1);
        ds[0] = _dataset("cmip6");
        vm.expectEmit(true, false, false, true);
        emit ProviderRegistered(sp2, "b.example:22", HOST_KEY);
        vm.expectEmit(true, false, false, true);
        emit DatasetAdded(sp2, "cmip6");
        vm.prank(sp2);
        reg.registerProvider("b.example:22", HOST_KEY, _offer(), ds);
    }

    function test_registerProvider_refusesASecondRegistration() public {
        ProviderRegistry.Dataset[] memory none;
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.AlreadyRegistered.selector, sp));
        vm.prank(sp);
        reg.registerProvider("sp.example:2222", HOST_KEY, _offer(), none);
    }

    function test_registerProvider_refusesEmptyAndOverlongFields() public {
        ProviderRegistry.Dataset[] memory none;
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.EmptyField.selector, "endpoint"));
        vm.prank(sp2);
        reg.registerProvider("", HOST_KEY, _offer(), none);

        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.EmptyField.selector, "sshHostKey"));
        vm.prank(sp2);
        reg.registerProvider("b:22", "", _offer(), none);

        bytes memory long = new bytes(1025);
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.TooLong.selector, "endpoint", 1025, 1024));
        vm.prank(sp2);
        reg.registerProvider(string(long), HOST_KEY, _offer(), none);
    }

    function test_registerProvider_refusesAnOfferWithoutDisk() public {
        ProviderRegistry.Dataset[] memory none;
        ProviderRegistry.Offer memory offer = _offer();
        offer.diskMiB = 0;
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.InvalidOfferDisk.selector, 0, MAX_DISK));
        vm.prank(sp2);
        reg.registerProvider("b:22", HOST_KEY, offer, none);

        offer.maxDiskMiB = 0;
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.InvalidOfferDisk.selector, 0, 0));
        vm.prank(sp2);
        reg.registerProvider("b:22", HOST_KEY, offer, none);

        offer.diskMiB = 31;
        offer.maxDiskMiB = MAX_DISK;
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.InvalidOfferDisk.selector, 31, MAX_DISK));
        vm.prank(sp2);
        reg.registerProvider("b:22", HOST_KEY, offer, none);
    }

    function test_registerProvider_refusesADefaultDiskAboveTheMaximum() public {
        ProviderRegistry.Dataset[] memory none;
        ProviderRegistry.Offer memory offer = _offer();
        offer.diskMiB = MAX_DISK + 1;
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.InvalidOfferDisk.selector, MAX_DISK + 1, MAX_DISK));
        vm.prank(sp2);
        reg.registerProvider("b:22", HOST_KEY, offer, none);

        // A default equal to the maximum is fine.
        offer.diskMiB = MAX_DISK;
        vm.prank(sp2);
        reg.registerProvider("b:22", HOST_KEY, offer, none);
        assertEq(_provider(sp2).offer.diskMiB, MAX_DISK, "disk");
    }

    function test_registerProvider_refusesDuplicateDatasetIds() public {
        ProviderRegistry.Dataset[] memory ds = new ProviderRegistry.Dataset[](2);
        ds[0] = _dataset("x");
        ds[1] = _dataset("x");
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.DatasetExists.selector, sp2, "x"));
        vm.prank(sp2);
        reg.registerProvider("b:22", HOST_KEY, _offer(), ds);
    }

    function test_updateProvider_replacesEndpointKeyAndOffer() public {
        ProviderRegistry.Offer memory offer = _offer();
        offer.pricePerSecond = 5;
        vm.expectEmit(true, false, false, true);
        emit ProviderUpdated(sp, "new.example:2200", "ssh-rsa AAAAB3 sp");
        vm.prank(sp);
        reg.updateProvider("new.example:2200", "ssh-rsa AAAAB3 sp", offer);
        ProviderRegistry.Provider memory p = _provider(sp);
        assertEq(p.endpoint, "new.example:2200", "endpoint");
        assertEq(p.sshHostKey, "ssh-rsa AAAAB3 sp", "key");
        assertEq(p.offer.pricePerSecond, 5, "price");
    }

    function test_updateProvider_refusesAnInvalidDiskOffer() public {
        ProviderRegistry.Offer memory offer = _offer();
        offer.maxDiskMiB = DISK - 1;
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.InvalidOfferDisk.selector, DISK, DISK - 1));
        vm.prank(sp);
        reg.updateProvider("sp.example:2222", HOST_KEY, offer);

        offer = _offer();
        offer.diskMiB = 0;
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.InvalidOfferDisk.selector, 0, MAX_DISK));
        vm.prank(sp);
        reg.updateProvider("sp.example:2222", HOST_KEY, offer);
        assertEq(_provider(sp).offer.diskMiB, DISK, "the old offer stands");
    }

    function test_updateProvider_refusesUnknownAndWithdrawnProviders() public {
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.ProviderNotFound.selector, stranger));
        vm.prank(stranger);
        reg.updateProvider("a:1", HOST_KEY, _offer());

        vm.prank(sp);
        reg.withdrawProvider();
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.ProviderInactive.selector, sp));
        vm.prank(sp);
        reg.updateProvider("a:1", HOST_KEY, _offer());
    }

    function test_withdrawProvider_blocksNewOrdersButNotLiveOnes() public {
        uint256 id = _active();
        vm.expectEmit(true, false, false, true);
        emit ProviderWithdrawn(sp);
        vm.prank(sp);
        reg.withdrawProvider();
        assertFalse(_provider(sp).active, "inactive");

        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.ProviderInactive.selector, sp));
        vm.prank(client);
        m.createOrder{value: ESCROW}(sp, _terms());

        // The live order still runs and can be claimed.
        vm.warp(T0 + 10);
        _claim(id, _head(1), 10, 0, 0);
        assertEq(m.getOrder(id).claimedSeconds, 10, "claimed");
    }

    function test_withdrawProvider_twiceIsRefused() public {
        vm.prank(sp);
        reg.withdrawProvider();
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.ProviderInactive.selector, sp));
        vm.prank(sp);
        reg.withdrawProvider();
    }

    function test_reRegistering_afterWithdrawReplacesDatasetsAndKeepsRatings() public {
        uint256 id = _active();
        vm.warp(T0 + 10);
        _claim(id, _head(1), 10, 0, 0);
        vm.prank(client);
        m.terminate(id);
        vm.prank(client);
        m.rate(id, 4, "ok");
        vm.prank(sp);
        reg.withdrawProvider();

        ProviderRegistry.Dataset[] memory ds = new ProviderRegistry.Dataset[](1);
        ds[0] = _dataset("cmip6");
        vm.expectEmit(true, false, false, true);
        emit DatasetRemoved(sp, "era5");
        vm.prank(sp);
        reg.registerProvider("again:22", HOST_KEY, _offer(), ds);

        ProviderRegistry.Provider memory p = _provider(sp);
        assertTrue(p.active, "active again");
        assertEq(p.endpoint, "again:22", "endpoint");
        assertEq(p.ratingCount, 1, "rating kept");
        assertEq(_datasets(sp).length, 1, "datasets replaced");
        assertEq(_datasets(sp)[0].id, "cmip6", "new dataset");
        assertEq(reg.providerAddresses().length, 1, "listed once");
    }

    function test_datasets_addAndRemoveKeepTheIndexConsistent() public {
        vm.startPrank(sp);
        reg.addDataset(_dataset("b"));
        reg.addDataset(_dataset("c"));
        vm.expectEmit(true, false, false, true);
        emit DatasetRemoved(sp, "era5");
        reg.removeDataset("era5");
        vm.stopPrank();
        // "c" moved into era5's slot; every remaining id still resolves to itself.
        ProviderRegistry.Dataset[] memory ds = _datasets(sp);
        assertEq(ds.length, 2, "two left");
        assertEq(_findDataset(sp, "b").id, "b", "b");
        assertEq(_findDataset(sp, "c").id, "c", "c");
        vm.prank(sp);
        reg.removeDataset("c");
        assertEq(_findDataset(sp, "b").id, "b", "b after second removal");
        assertEq(_datasets(sp).length, 1, "one left");
    }

    function test_datasets_refuseUnknownDuplicateAndEmptyIds() public {
        vm.startPrank(sp);
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.UnknownDataset.selector, sp, "nope"));
        reg.removeDataset("nope");
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.DatasetExists.selector, sp, "era5"));
        reg.addDataset(_dataset("era5"));
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.EmptyField.selector, "dataset.id"));
        reg.addDataset(_dataset(""));
        vm.stopPrank();
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.ProviderNotFound.selector, stranger));
        vm.prank(stranger);
        reg.addDataset(_dataset("x"));
    }

    function test_views_refuseUnknownProviders() public {
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.ProviderNotFound.selector, stranger));
        reg.getProvider(stranger);
    }

    function test_constructor_fixesOneVerifierPerCapacity() public view {
        assertEq(m.supportedCapacities().length, 1, "one capacity");
        assertEq(m.supportedCapacities()[0], CAP, "capacity");
        assertEq(address(m.verifierFor(CAP)), address(verifier), "verifier");
        assertEq(address(m.verifierFor(32)), address(0), "none for 32");
    }

    function test_constructor_refusesBadVerifierSets() public {
        uint32[] memory caps = new uint32[](2);
        ITickVerifier[] memory one = new ITickVerifier[](1);
        vm.expectRevert(abi.encodeWithSelector(Marketplace.VerifierConfigMismatch.selector, 2, 1));
        new Marketplace(caps, one, CLAIM_WINDOW);

        ITickVerifier[] memory two = new ITickVerifier[](2);
        TestTickVerifier v = new TestTickVerifier();
        two[0] = v;
        two[1] = v;
        caps[0] = 16;
        caps[1] = 16;
        vm.expectRevert(abi.encodeWithSelector(Marketplace.InvalidVerifier.selector, 16));
        new Marketplace(caps, two, CLAIM_WINDOW);

        caps[1] = 0;
        vm.expectRevert(abi.encodeWithSelector(Marketplace.InvalidVerifier.selector, 0));
        new Marketplace(caps, two, CLAIM_WINDOW);

        caps[1] = 32;
        two[1] = ITickVerifier(address(0));
        vm.expectRevert(abi.encodeWithSelector(Marketplace.InvalidVerifier.selector, 32));
        new Marketplace(caps, two, CLAIM_WINDOW);
    }
}
