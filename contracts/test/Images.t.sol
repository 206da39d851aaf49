// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {MarketplaceBase} from "./MarketplaceBase.sol";
import {Marketplace} from "../src/Marketplace.sol";
import {ProviderRegistry} from "../src/ProviderRegistry.sol";

/// The provider's image catalog and the image digest an order names.
contract ImagesTest is MarketplaceBase {
    event ImageAdded(address indexed provider, string name, bytes32 digest);
    event ImageRemoved(address indexed provider, string name);

    bytes32 constant PYTORCH = 0x1111111111111111111111111111111111111111111111111111111111111111;
    bytes32 constant DEBIAN = 0x2222222222222222222222222222222222222222222222222222222222222222;

    function _image(string memory name, bytes32 digest) internal pure returns (ProviderRegistry.Image memory) {
        return ProviderRegistry.Image({
            name: name,
            digest: digest,
            description: "CUDA 12 + PyTorch 2",
            gpuReady: true,
            sizeBytes: 9_000_000_000
        });
    }

    function _add(string memory name, bytes32 digest) internal {
        vm.prank(sp);
        reg.addImage(_image(name, digest));
    }

    function _termsWith(bytes32 digest) internal pure returns (Marketplace.Terms memory t) {
        t = _terms();
        t.imageDigest = digest;
    }

    function test_addImage_listsItWithTheProvider() public {
        assertEq(_images(sp).length, 0, "empty catalog");
        vm.expectEmit(true, false, false, true);
        emit ImageAdded(sp, "pytorch", PYTORCH);
        _add("pytorch", PYTORCH);
        ProviderRegistry.Image[] memory images = _images(sp);
        assertEq(images.length, 1, "one image");
        assertEq(images[0].name, "pytorch", "name");
        assertEq(images[0].digest, PYTORCH, "digest");
        assertEq(images[0].description, "CUDA 12 + PyTorch 2", "description");
        assertTrue(images[0].gpuReady, "gpu ready");
        assertEq(images[0].sizeBytes, 9_000_000_000, "size");
    }

    function test_removeImage_keepsTheIndexConsistent() public {
        _add("a", PYTORCH);
        _add("b", DEBIAN);
        _add("c", DEBIAN);
        vm.expectEmit(true, false, false, true);
        emit ImageRemoved(sp, "a");
        vm.prank(sp);
        reg.removeImage("a");
        ProviderRegistry.Image[] memory images = _images(sp);
        assertEq(images.length, 2, "two left");
        assertEq(images[0].name, "c", "c moved into a's slot");
        assertEq(images[0].digest, DEBIAN, "with its digest");
        assertEq(images[0].description, "CUDA 12 + PyTorch 2", "and its description");
        assertEq(images[1].name, "b", "b");
        // "c" is still found by name after the move: it can be removed, and re-added.
        vm.startPrank(sp);
        reg.removeImage("c");
        reg.addImage(_image("a", DEBIAN));
        vm.stopPrank();
        assertEq(_images(sp).length, 2, "b and a");
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.UnknownImage.selector, sp, "c"));
        vm.prank(sp);
        reg.removeImage("c");
    }

    function test_addImage_refusesADuplicateNameEvenWithAnotherDigest() public {
        _add("pytorch", PYTORCH);
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.ImageExists.selector, sp, "pytorch"));
        vm.prank(sp);
        reg.addImage(_image("pytorch", DEBIAN));
        // Remove first, then the name can be pinned to another digest.
        vm.startPrank(sp);
        reg.removeImage("pytorch");
        reg.addImage(_image("pytorch", DEBIAN));
        vm.stopPrank();
        assertEq(_images(sp)[0].digest, DEBIAN, "re-pinned");
    }

    function test_addImage_refusesBadEntries() public {
        vm.startPrank(sp);
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.EmptyField.selector, "image.name"));
        reg.addImage(_image("", PYTORCH));
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.EmptyField.selector, "image.digest"));
        reg.addImage(_image("x", bytes32(0)));
        bytes memory name128 = new bytes(128);
        for (uint256 i = 0; i < 128; i++) {
            name128[i] = "n";
        }
        reg.addImage(_image(string(name128), PYTORCH));
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.TooLong.selector, "image.name", 129, 128));
        reg.addImage(_image(string(bytes.concat(name128, "n")), PYTORCH));
        ProviderRegistry.Image memory long = _image("long", PYTORCH);
        long.description = string(new bytes(1025));
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.TooLong.selector, "image.description", 1025, 1024));
        reg.addImage(long);
        vm.stopPrank();
    }

    function test_addImage_isBoundedTo64Images() public {
        vm.startPrank(sp);
        for (uint256 i = 0; i < 64; i++) {
            reg.addImage(_image(string(bytes.concat(bytes1(uint8(65 + i / 8)), bytes1(uint8(65 + i % 8)))), PYTORCH));
        }
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.TooManyImages.selector, 64));
        reg.addImage(_image("one too many", PYTORCH));
        vm.stopPrank();
        assertEq(_images(sp).length, 64, "64 images");
    }

    function test_addImage_onlyByARegisteredActiveProvider() public {
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.ProviderNotFound.selector, stranger));
        vm.prank(stranger);
        reg.addImage(_image("x", PYTORCH));
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.UnknownImage.selector, stranger, "x"));
        vm.prank(stranger);
        reg.removeImage("x");
        // A stranger cannot remove the provider's image: removal is by the caller's own catalog.
        _add("x", PYTORCH);
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.UnknownImage.selector, stranger, "x"));
        vm.prank(stranger);
        reg.removeImage("x");
        vm.prank(sp);
        reg.withdrawProvider();
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.ProviderInactive.selector, sp));
        vm.prank(sp);
        reg.addImage(_image("y", PYTORCH));
    }

    function test_createOrder_withACatalogDigestStoresIt() public {
        _add("pytorch", PYTORCH);
        _add("debian", DEBIAN);
        uint256 id = _createWith(_termsWith(DEBIAN), ESCROW);
        assertEq(m.getOrder(id).terms.imageDigest, DEBIAN, "getOrder returns the digest");
    }

    function test_createOrder_refusesADigestOutsideTheCatalog() public {
        _add("pytorch", PYTORCH);
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.UnknownImageDigest.selector, sp, DEBIAN));
        _createWith(_termsWith(DEBIAN), ESCROW);
    }

    function test_createOrder_refusesZeroWhenTheProviderListsImages() public {
        _add("pytorch", PYTORCH);
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.UnknownImageDigest.selector, sp, bytes32(0)));
        _createWith(_termsWith(bytes32(0)), ESCROW);
    }

    function test_createOrder_withoutACatalogTakesZeroOnly() public {
        uint256 id = _createWith(_termsWith(bytes32(0)), ESCROW);
        assertEq(m.getOrder(id).terms.imageDigest, bytes32(0), "the provider's built-in default");
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.UnknownImageDigest.selector, sp, PYTORCH));
        _createWith(_termsWith(PYTORCH), ESCROW);
    }

    function test_removeImage_unlistsItsDigestOnlyWhenNoOtherNamePinsIt() public {
        _add("default", PYTORCH);
        _add("pytorch", PYTORCH);
        vm.prank(sp);
        reg.removeImage("default");
        uint256 id = _createWith(_termsWith(PYTORCH), ESCROW);
        assertEq(m.getOrder(id).terms.imageDigest, PYTORCH, "still pinned by pytorch");
        vm.prank(sp);
        reg.removeImage("pytorch");
        // The catalog is empty again: 0 is allowed, the removed digest is not; the live order keeps it.
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.UnknownImageDigest.selector, sp, PYTORCH));
        _createWith(_termsWith(PYTORCH), ESCROW);
        _createWith(_termsWith(bytes32(0)), ESCROW);
        assertEq(m.getOrder(id).terms.imageDigest, PYTORCH, "the order keeps its image");
    }

    function test_catalog_survivesWithdrawAndReRegistration() public {
        _add("pytorch", PYTORCH);
        vm.prank(sp);
        reg.withdrawProvider();
        ProviderRegistry.Dataset[] memory none;
        vm.prank(sp);
        reg.registerProvider("sp.example:2222", HOST_KEY, _offer(), none);
        assertEq(_images(sp).length, 1, "kept");
    }

    // ------------------------------------------------------------ client-brought images

    function _allow(string memory host) internal {
        string[] memory hosts = new string[](1);
        hosts[0] = host;
        vm.prank(sp);
        reg.setClientImageRegistries(hosts);
    }

    function _clientTerms(string memory repository, bytes32 digest) internal pure returns (Marketplace.Terms memory t) {
        t = _termsWith(digest);
        t.imageRepository = repository;
    }

    function test_clientImage_fromAnAllowedRegistryIsOrderedAndRecorded() public {
        _add("default", DEBIAN);
        _allow("registry.example:5000");
        uint256 id = _createWith(_clientTerms("registry.example:5000/team/pytorch", PYTORCH), ESCROW);
        Marketplace.Order memory o = m.getOrder(id);
        assertEq(o.terms.imageDigest, PYTORCH, "digest");
        assertEq(o.terms.imageRepository, "registry.example:5000/team/pytorch", "repository");
        assertEq(reg.clientImageRegistries(sp)[0], "registry.example:5000", "listed");
    }

    function test_clientImage_isRefusedWhenTheProviderAllowsNone() public {
        vm.prank(client);
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.ClientImagesNotAllowed.selector, sp));
        m.createOrder{value: ESCROW}(sp, _clientTerms("registry.example:5000/team/pytorch", PYTORCH));
    }

    function test_clientImage_fromAnotherRegistryIsRefused() public {
        _allow("registry.example:5000");
        // Another host, a host that only starts like the allowed one, and no path at all.
        string[3] memory repos =
            ["docker.io/library/debian", "registry.example:50001/x", "registry.example:5000/"];
        for (uint256 i = 0; i < repos.length; i++) {
            vm.prank(client);
            vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.RegistryNotAllowed.selector, sp, repos[i]));
            m.createOrder{value: ESCROW}(sp, _clientTerms(repos[i], PYTORCH));
        }
    }

    function test_clientImage_needsADigestAndAPlainRepository() public {
        _allow("registry.example:5000");
        vm.prank(client);
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.EmptyField.selector, "imageDigest"));
        m.createOrder{value: ESCROW}(sp, _clientTerms("registry.example:5000/team/pytorch", bytes32(0)));
        string memory tagged = "registry.example:5000/team/pytorch@sha256:11";
        vm.prank(client);
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.InvalidImageRepository.selector, tagged));
        m.createOrder{value: ESCROW}(sp, _clientTerms(tagged, PYTORCH));
    }

    function test_setClientImageRegistries_replacesTheListAndChecksHosts() public {
        _allow("a.example");
        _allow("b.example:5000");
        string[] memory hosts = reg.clientImageRegistries(sp);
        assertEq(hosts.length, 1, "replaced");
        assertEq(hosts[0], "b.example:5000", "the new host");
        string[] memory bad = new string[](1);
        bad[0] = "a.example/path";
        vm.prank(sp);
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.InvalidImageRepository.selector, "a.example/path"));
        reg.setClientImageRegistries(bad);
        vm.prank(sp);
        reg.setClientImageRegistries(new string[](0));
        assertEq(reg.clientImageRegistries(sp).length, 0, "none allowed again");
    }
}
