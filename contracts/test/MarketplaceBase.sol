// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Test} from "./Base.sol";
import {TestTickVerifier} from "./TestTickVerifier.sol";
import {Marketplace} from "../src/Marketplace.sol";
import {ProviderRegistry} from "../src/ProviderRegistry.sol";
import {ITickVerifier} from "../src/ITickVerifier.sol";

/// Shared fixture: a marketplace with the test-only verifier for capacity 16, a registered
/// provider `sp` serving dataset "era5", a funded `client` and a `stranger`.
abstract contract MarketplaceBase is Test {
    Marketplace internal m;
    ProviderRegistry internal reg;
    TestTickVerifier internal verifier;

    address internal sp = address(0x5900);
    address internal sp2 = address(0x5901);
    address internal client = address(0xC11E);
    address internal stranger = address(0xBAD);

    uint32 internal constant CAP = 16;
    // Odd amounts so that every rounding rule shows up in the wei.
    uint256 internal constant ESCROW = 10_000_000_007;
    uint256 internal constant COLLATERAL = 1_000_000_001;
    uint256 internal constant PPS = 1_000_003;
    uint256 internal constant PPG = 7_000_000_001;
    uint64 internal constant MAX_DURATION = 3_600;
    uint64 internal constant ACCEPT_TIMEOUT = 600;
    /// The claim window this fixture deploys with (what the constructor takes).
    uint64 internal constant CLAIM_WINDOW = 1 days;
    /// Bytes an order may be paid for without an acknowledgment: 1 GiB in the fixture.
    uint64 internal constant BYTE_ALLOWANCE = 1 << 30;
    /// The client's per-order acknowledgment key (a private key: tests sign with it).
    uint256 internal constant ACK_KEY = 0xA11CE;
    /// The offer's default disk (20 GiB) and its maximum per order (100 GiB).
    uint64 internal constant DISK = 20_480;
    uint64 internal constant MAX_DISK = 102_400;
    uint256 internal constant T0 = 1_700_000_000;
    // A literal, not sha256(...): the precompile call would consume a pending vm.prank.
    bytes32 internal constant FINGERPRINT = 0xf58bc21c75eb95d03efad6cf906a79619967d2c54c6da622e369673ed188eb76;
    string internal constant HOST_KEY =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILpbI6zHCqIRA4Rgyh8OHoWol7YJ57KPTCrSIlgfr2xe sp";

    function setUp() public virtual {
        vm.warp(T0);
        verifier = new TestTickVerifier();
        uint32[] memory caps = new uint32[](1);
        caps[0] = CAP;
        ITickVerifier[] memory vs = new ITickVerifier[](1);
        vs[0] = verifier;
        m = new Marketplace(caps, vs, CLAIM_WINDOW);
        reg = m.registry();
        vm.deal(client, 1_000 ether);
        vm.deal(sp, 1_000 ether);
        vm.deal(stranger, 1_000 ether);
        _register(sp);
    }

    function _offer() internal pure returns (ProviderRegistry.Offer memory) {
        return ProviderRegistry.Offer({
            cpus: 8,
            memoryMiB: 32_768,
            diskMiB: DISK,
            maxDiskMiB: MAX_DISK,
            gpuModel: "NVIDIA L4",
            gpuCount: 1,
            pricePerSecond: PPS,
            pricePerGiB: PPG
        });
    }

    function _dataset(string memory id) internal pure returns (ProviderRegistry.Dataset memory) {
        return ProviderRegistry.Dataset({
            id: id,
            pieceCid: "baga6ea4seaqao7s73y24kcutaosvacpdjgfe5pw76ooefnyqw4ynr3d2y6x2mpq",
            dealId: 0,
            sizeBytes: 34_359_738_368,
            description: "ERA5 reanalysis"
        });
    }

    function _register(address who) internal {
        ProviderRegistry.Dataset[] memory ds = new ProviderRegistry.Dataset[](1);
        ds[0] = _dataset("era5");
        vm.prank(who);
        reg.registerProvider("sp.example:2222", HOST_KEY, _offer(), ds);
    }

    function _terms() internal pure returns (Marketplace.Terms memory) {
        return Marketplace.Terms({
            keyFingerprint: FINGERPRINT,
            ackSigner: vm.addr(ACK_KEY),
            byteAllowance: BYTE_ALLOWANCE,
            cpus: 2,
            memoryMiB: 2048,
            diskMiB: 10_240,
            gpus: 0,
            datasetId: "era5",
            imageDigest: bytes32(0),
            pricePerSecond: PPS,
            pricePerGiB: PPG,
            maxDuration: MAX_DURATION,
            collateral: COLLATERAL,
            imageRepository: "",
            acceptTimeout: ACCEPT_TIMEOUT
        });
    }

    function _create() internal returns (uint256 id) {
        vm.prank(client);
        id = m.createOrder{value: ESCROW}(sp, _terms());
    }

    function _createWith(Marketplace.Terms memory terms, uint256 escrow) internal returns (uint256 id) {
        vm.prank(client);
        id = m.createOrder{value: escrow}(sp, terms);
    }

    function _accept(uint256 id) internal {
        // Read before the prank: a prank applies to the very next call, the getter included.
        uint256 collateral = m.getOrder(id).terms.collateral;
        vm.prank(sp);
        m.accept{value: collateral}(id);
    }

    function _active() internal returns (uint256 id) {
        id = _create();
        _accept(id);
    }

    function _head(uint256 n) internal pure returns (bytes32) {
        return bytes32(n);
    }

    /// The proof the test verifier accepts for a batch on top of the order's stored head.
    function _proof(uint256 id, bytes32 nextHead, uint64 secs, uint64 bytesIn, uint64 bytesOut)
        internal
        view
        returns (bytes memory)
    {
        bytes32 prev = m.getOrder(id).head;
        uint256[6] memory input =
            [m.orderKey(id), uint256(prev), uint256(nextHead), uint256(secs), uint256(bytesIn), uint256(bytesOut)];
        return verifier.proofFor(input);
    }

    function _claim(uint256 id, bytes32 nextHead, uint64 secs, uint64 bytesIn, uint64 bytesOut) internal {
        bytes memory proof = _proof(id, nextHead, secs, bytesIn, bytesOut);
        vm.prank(sp);
        m.claim(id, CAP, nextHead, secs, bytesIn, bytesOut, proof);
    }

    function _ack(uint256 id, bytes32 head, uint64 secs, uint64 bytesIn, uint64 bytesOut)
        internal
        pure
        returns (Marketplace.Acknowledgment memory)
    {
        return Marketplace.Acknowledgment({
            orderId: id, head: head, leaseSeconds: secs, bytesIn: bytesIn, bytesOut: bytesOut
        });
    }

    /// A 65-byte signature (r, s, v) of `ack` by `key`.
    function _sign(uint256 key, Marketplace.Acknowledgment memory ack) internal view returns (bytes memory) {
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(key, m.acknowledgmentDigest(ack));
        return abi.encodePacked(r, s, v);
    }

    /// Records an acknowledgment by the fixture's ack key (submitted by a stranger: anyone may).
    function _acknowledge(uint256 id, bytes32 head, uint64 secs, uint64 bytesIn, uint64 bytesOut) internal {
        Marketplace.Acknowledgment memory ack = _ack(id, head, secs, bytesIn, bytesOut);
        bytes memory sig = _sign(ACK_KEY, ack);
        vm.prank(stranger);
        m.acknowledge(id, ack, sig);
    }

    function _state(uint256 id) internal view returns (uint256) {
        return uint256(m.getOrder(id).state);
    }

    /// The tariff rule of the contract's doc, computed here on its own: what a batch must be paid.
    function _price(uint64 secs, uint64 bytesMoved) internal pure returns (uint256) {
        return uint256(secs) * PPS + (uint256(bytesMoved) * PPG) / (1 << 30);
    }

    /// Bytes the order may still be paid for: max(acknowledged, allowance) minus claimed (paid or
    /// forfeited), from getOrder; 0 once the claims went past the bound.
    // Constants and views the contract keeps internal or leaves out (runtime size, EIP-170):
    // the values it uses, and the figures shale-contracts derives from `getOrder`/`getProvider`.
    uint64 internal constant MAX_DURATION_LIMIT = 10 * 365 days;
    uint256 internal constant MAX_PRICE = type(uint128).max;
    uint256 internal constant SNARK_SCALAR_FIELD =
        21888242871839275222246405745257275088548364400416034343698204186575808495617;

    function _provider(address who) internal view returns (ProviderRegistry.Provider memory p) {
        (p,,) = reg.getProvider(who);
    }

    function _datasets(address who) internal view returns (ProviderRegistry.Dataset[] memory ds) {
        (, ds,) = reg.getProvider(who);
    }

    function _images(address who) internal view returns (ProviderRegistry.Image[] memory images) {
        (,, images) = reg.getProvider(who);
    }

    /// The provider's dataset `id`; fails the test when it has none.
    function _findDataset(address who, string memory id) internal view returns (ProviderRegistry.Dataset memory) {
        ProviderRegistry.Dataset[] memory ds = _datasets(who);
        for (uint256 i = 0; i < ds.length; i++) {
            if (keccak256(bytes(ds[i].id)) == keccak256(bytes(id))) return ds[i];
        }
        revert(string.concat("no dataset ", id));
    }

    /// Rating count and weighted average in hundredths of a star, floored (0 with no ratings).
    function _rating(address who) internal view returns (uint64 count, uint256 average) {
        ProviderRegistry.Provider memory p = _provider(who);
        count = p.ratingCount;
        average = p.ratingWeight == 0 ? 0 : (p.ratingWeightedStars * 100) / p.ratingWeight;
    }

    /// Seconds the provider may still claim now: the lease's chain time so far less what it claimed.
    function _claimableSeconds(uint256 id) internal view returns (uint64) {
        Marketplace.Order memory o = m.getOrder(id);
        if (o.state != Marketplace.OrderState.Active && o.state != Marketplace.OrderState.Ended) return 0;
        uint64 end = o.state == Marketplace.OrderState.Ended ? o.endedAt : uint64(block.timestamp);
        uint64 expiry = o.acceptedAt + o.terms.maxDuration;
        if (end > expiry) end = expiry;
        return end - o.acceptedAt - o.claimedSeconds;
    }

    function _claimableBytes(uint256 id) internal view returns (uint256) {
        Marketplace.Order memory o = m.getOrder(id);
        uint256 allowed = o.ackedBytes > o.terms.byteAllowance ? o.ackedBytes : o.terms.byteAllowance;
        return allowed > o.claimedBytes ? allowed - o.claimedBytes : 0;
    }

    function _sumOfBalances() internal view returns (uint256) {
        return client.balance + sp.balance + address(m).balance;
    }
}
