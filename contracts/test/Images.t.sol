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
        r.addImage(_image(name, digest));
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
        r.removeImage("a");
        ProviderRegistry.Image[] memory images = _images(sp);
        assertEq(images.length, 2, "two left");
        assertEq(images[0].name, "c", "c moved into a's slot");
        assertEq(images[0].digest, DEBIAN, "with its digest");
        assertEq(images[0].description, "CUDA 12 + PyTorch 2", "and its description");
        assertEq(images[1].name, "b", "b");
        // "c" is still found by name after the move: it can be removed, and re-added.
        vm.startPrank(sp);
        r.removeImage("c");
        r.addImage(_image("a", DEBIAN));
        vm.stopPrank();
        assertEq(_images(sp).length, 2, "b and a");
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.UnknownImage.selector, sp, "c"));
        vm.prank(sp);
        r.removeImage("c");
    }

    function test_addImage_refusesADuplicateNameEvenWithAnotherDigest() public {
        _add("pytorch", PYTORCH);
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.ImageExists.selector, sp, "pytorch"));
        vm.prank(sp);
        r.addImage(_image("pytorch", DEBIAN));
        // Remove first, then the name can be pinned to another digest.
        vm.startPrank(sp);
        r.removeImage("pytorch");
        r.addImage(_image("pytorch", DEBIAN));
        vm.stopPrank();
        assertEq(_images(sp)[0].digest, DEBIAN, "re-pinned");
    }

    function test_addImage_refusesBadEntries() public {
        vm.startPrank(sp);
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.EmptyField.selector, "image.name"));
        r.addImage(_image("", PYTORCH));
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.EmptyField.selector, "image.digest"));
        r.addImage(_image("x", bytes32(0)));
        bytes memory name128 = new bytes(128);
        for (uint256 i = 0; i < 128; i++) {
            name128[i] = "n";
        }
        r.addImage(_image(string(name128), PYTORCH));
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.TooLong.selector, "image.name", 129, 128));
        r.addImage(_image(string(bytes.concat(name128, "n")), PYTORCH));
        ProviderRegistry.Image memory long = _image("long", PYTORCH);
        long.description = string(new bytes(1025));
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.TooLong.selector, "image.description", 1025, 1024));
        r.addImage(long);
        vm.stopPrank();
    }

    function test_addImage_isBoundedTo64Images() public {
        vm.startPrank(sp);
        for (uint256 i = 0; i < 64; i++) {
            r.addImage(_image(string(bytes.concat(bytes1(uint8(65 + i / 8)), bytes1(uint8(65 + i % 8)))), PYTORCH));
        }
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.TooManyImages.selector, 64));
        r.addImage(_image("one too many", PYTORCH));
        vm.stopPrank();
        assertEq(_images(sp).length, 64, "64 images");
    }

    function test_addImage_onlyByARegisteredActiveProvider() public {
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.ProviderNotFound.selector, stranger));
        vm.prank(stranger);
        r.addImage(_image("x", PYTORCH));
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.UnknownImage.selector, stranger, "x"));
        vm.prank(stranger);
        r.removeImage("x");
        // A stranger cannot remove the provider's image: removal is by the caller's own catalog.
        _add("x", PYTORCH);
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.UnknownImage.selector, stranger, "x"));
        vm.prank(stranger);
        r.removeImage("x");
        vm.prank(sp);
        r.withdrawProvider();
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.ProviderInactive.selector, sp));
        vm.prank(sp);
        r.addImage(_image("y", PYTORCH));
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
        r.removeImage("default");
        uint256 id = _createWith(_termsWith(PYTORCH), ESCROW);
        assertEq(m.getOrder(id).terms.imageDigest, PYTORCH, "still pinned by pytorch");
        vm.prank(sp);
        r.removeImage("pytorch");
        // The catalog is empty again: 0 is allowed, the removed digest is not; the live order keeps it.
        vm.expectRevert(abi.encodeWithSelector(ProviderRegistry.UnknownImageDigest.selector, sp, PYTORCH));
        _createWith(_termsWith(PYTORCH), ESCROW);
        _createWith(_termsWith(bytes32(0)), ESCROW);
        assertEq(m.getOrder(id).terms.imageDigest, PYTORCH, "the order keeps its image");
    }

    function test_catalog_survivesWithdrawAndReRegistration() public {
        _add("pytorch", PYTORCH);
        vm.prank(sp);
        r.withdrawProvider();
        ProviderRegistry.Dataset[] memory none;
        vm.prank(sp);
        r.registerProvider("sp.example:2222", HOST_KEY, _offer(), none);
        assertEq(_images(sp).length, 1, "kept");
    }
}
