// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Test} from "./Base.sol";
import {Party} from "./Party.sol";
import {TestTickVerifier} from "./TestTickVerifier.sol";
import {Marketplace} from "../src/Marketplace.sol";
import {ProviderRegistry} from "../src/ProviderRegistry.sol";
import {ITickVerifier} from "../src/ITickVerifier.sol";

/// Drives the marketplace for the invariant run: several orders between three clients and two
/// providers (all `Party` contracts, which may refuse, return-bomb or burn gas when paid), random
/// time jumps, and every money call: create, accept, cancel, top-up, terminate, the client's
/// wire traffic and acknowledgments, claims with and without an acknowledgment (honest and
/// greedy, with the test verifier, so the provider can "prove" anything, as a forged setup
/// could), replays, settle, withdraw. It keeps its own books (ghosts) to compare with the
/// contract's.
///
/// A handler call that does nothing reverts (`Skipped` when there was nothing to do, `Refused`
/// when the marketplace refused), so forge's table of calls and reverts per action reads as
/// attempts and refusals, and `calls - reverts` is what took effect.
contract Handler is Test {
    error Skipped();
    error Refused();

    uint256 internal constant GIB = 1 << 30;
    uint32 internal constant CAP = 16;
    /// Orders that are neither cancelled nor settled, at most: new ones replace finished ones.
    uint256 internal constant MAX_LIVE = 6;
    /// Orders over a run, at most (the invariants read every one after every call).
    uint256 internal constant MAX_ORDERS = 24;
    uint256 internal constant FUNDS = 1_000_000 ether;
    bytes32 internal constant FINGERPRINT = 0xf58bc21c75eb95d03efad6cf906a79619967d2c54c6da622e369673ed188eb76;

    Marketplace public m;
    ProviderRegistry public reg;
    TestTickVerifier public verifier;
    Party[] public clients;
    Party[] public providers;
    Party[] public actors;
    /// Every order of the run (the invariants check them all).
    uint256[] public ids;
    /// Orders not yet cancelled or settled (the actions pick from these).
    uint256[] public live;

    // Ghosts, per order id.
    mapping(uint256 => uint256) public ackKey;
    /// Bytes the client's tunnel counted on the wire: the most it will ever acknowledge.
    mapping(uint256 => uint256) public wire;
    /// The largest total the client signed.
    mapping(uint256 => uint256) public maxSigned;
    mapping(uint256 => uint256) public deposited;
    mapping(uint256 => uint256) public ghostPaid;
    mapping(uint256 => uint256) public ghostSeconds;
    /// Every proved byte of the claims that landed (paid or forfeited).
    mapping(uint256 => uint256) public ghostBytes;
    /// The bytes of those claims that were paid, by this handler's reading of the rule.
    mapping(uint256 => uint256) public ghostPaidBytes;
    mapping(uint256 => uint256) public settleCount;
    /// Successful exact replays of an already paid claim (must stay 0).
    uint256 public replaysPaid;
    uint256 public nextHead = 1;

    // The last successful claim, for replays.
    uint256 internal lastId;
    bytes internal lastCall;

    // Call counts (successful), for the README's figures.
    mapping(bytes32 => uint256) public calls;

    constructor() {
        verifier = new TestTickVerifier();
        uint32[] memory caps = new uint32[](1);
        caps[0] = CAP;
        ITickVerifier[] memory vs = new ITickVerifier[](1);
        vs[0] = verifier;
        m = new Marketplace(caps, vs, 1 hours);
        reg = m.registry();
        for (uint256 i = 0; i < 3; i++) {
            Party c = new Party();
            vm.deal(address(c), FUNDS);
            clients.push(c);
            actors.push(c);
        }
        for (uint256 i = 0; i < 2; i++) {
            Party p = new Party();
            vm.deal(address(p), FUNDS);
            ProviderRegistry.Offer memory offer = ProviderRegistry.Offer({
                cpus: 8,
                memoryMiB: 32_768,
                diskMiB: 1_024,
                maxDiskMiB: 102_400,
                gpuModel: "",
                gpuCount: 0,
                pricePerSecond: 1,
                pricePerGiB: 1
            });
            p.exec(
                address(reg),
                0,
                abi.encodeCall(
                    ProviderRegistry.registerProvider,
                    ("sp.example:22", "ssh-ed25519 AAAA sp", offer, new ProviderRegistry.Dataset[](0))
                )
            );
            providers.push(p);
            actors.push(p);
        }
    }

    // ------------------------------------------------------------ actions

    function createOrder(
        uint256 clientSeed,
        uint256 providerSeed,
        uint256 escrow,
        uint256 duration,
        uint256 allowance,
        uint256 pps,
        uint256 ppg,
        uint256 collateral,
        bool withAckKey
    ) external {
        _prune();
        if (live.length >= MAX_LIVE || ids.length >= MAX_ORDERS) revert Skipped();
        Party c = clients[clientSeed % clients.length];
        Party p = providers[providerSeed % providers.length];
        uint256 id = m.orderCount() + 1;
        uint256 key = 0xA000 + id;
        Marketplace.Terms memory terms = Marketplace.Terms({
            keyFingerprint: FINGERPRINT,
            ackSigner: withAckKey ? vm.addr(key) : address(0),
            byteAllowance: uint64(bound(allowance, 0, 4 * GIB)),
            cpus: 1,
            memoryMiB: 512,
            diskMiB: 1_024,
            gpus: 0,
            maxDuration: uint64(bound(duration, 1, 2 hours)),
            acceptTimeout: 1 hours,
            datasetId: "",
            imageDigest: bytes32(0),
            pricePerSecond: bound(pps, 0, 1e12),
            pricePerGiB: bound(ppg, 0, 1e15),
            collateral: bound(collateral, 0, 10 ether),
            imageRepository: ""
        });
        escrow = bound(escrow, 1, 100 ether);
        try c.exec(address(m), escrow, abi.encodeCall(Marketplace.createOrder, (address(p), terms))) {
            ids.push(id);
            live.push(id);
            ackKey[id] = key;
            deposited[id] = escrow;
            calls["createOrder"]++;
        } catch {
            revert Refused();
        }
    }

    function accept(uint256 orderSeed) external {
        (uint256 id, Marketplace.Order memory o) = _pickIn(orderSeed, PENDING);
        if (id == 0) revert Skipped();
        try Party(payable(o.provider)).exec(address(m), o.terms.collateral, abi.encodeCall(Marketplace.accept, (id))) {
            calls["accept"]++;
        } catch {
            revert Refused();
        }
    }

    function cancel(uint256 orderSeed, bool byClient) external {
        // Rarer than the other actions: a declined order does nothing more.
        if (orderSeed % 4 != 0) revert Skipped();
        (uint256 id, Marketplace.Order memory o) = _pickIn(orderSeed / 4, PENDING);
        if (id == 0) revert Skipped();
        Party who = Party(payable(byClient ? o.client : o.provider));
        try who.exec(address(m), 0, abi.encodeCall(Marketplace.cancel, (id))) {
            calls["cancel"]++;
        } catch {
            revert Refused();
        }
    }

    function topUp(uint256 orderSeed, uint256 amount) external {
        (uint256 id, Marketplace.Order memory o) = _pickIn(orderSeed, PENDING | ACTIVE);
        if (id == 0) revert Skipped();
        amount = bound(amount, 1, 10 ether);
        try Party(payable(o.client)).exec(address(m), amount, abi.encodeCall(Marketplace.topUp, (id))) {
            deposited[id] += amount;
            calls["topUp"]++;
        } catch {
            revert Refused();
        }
    }

    function terminate(uint256 orderSeed, bool byClient) external {
        (uint256 id, Marketplace.Order memory o) = _pickIn(orderSeed, ACTIVE);
        if (id == 0) revert Skipped();
        Party who = Party(payable(byClient ? o.client : o.provider));
        try who.exec(address(m), 0, abi.encodeCall(Marketplace.terminate, (id))) {
            calls["terminate"]++;
        } catch {
            revert Refused();
        }
    }

    /// Bytes cross the client's tunnel while the lease runs.
    function traffic(uint256 orderSeed, uint256 amount) external {
        (uint256 id, Marketplace.Order memory o) = _pickIn(orderSeed, ACTIVE);
        if (id == 0 || o.state != Marketplace.OrderState.Active) revert Skipped();
        wire[id] += bound(amount, 0, 2 * GIB);
        calls["traffic"]++;
    }

    /// The client acknowledges what its tunnel counted (or, sometimes, an older total), and
    /// anyone submits it.
    function acknowledge(uint256 orderSeed, uint256 share, uint256 split, uint256 submitterSeed) external {
        (uint256 id,) = _pickIn(orderSeed, ACTIVE | ENDED);
        if (id == 0) revert Skipped();
        (Marketplace.Acknowledgment memory ack, bytes memory sig) = _signedAck(id, share, split);
        Party submitter = actors[submitterSeed % actors.length];
        try submitter.exec(address(m), 0, abi.encodeCall(Marketplace.acknowledge, (id, ack, sig))) {
            calls["acknowledge"]++;
        } catch {
            revert Refused();
        }
    }

    /// The provider claims a batch: honest bytes (what the wire saw and it has not been paid
    /// for) or greedy ones, any seconds up to twice what the chain allows, with or without the
    /// client's newest acknowledgment.
    function claim(uint256 orderSeed, uint256 secs, uint256 bytesSeed, bool greedy, bool withAck, uint256 split)
        external
    {
        (uint256 id, Marketplace.Order memory o) = _pickIn(orderSeed, ACTIVE | ENDED);
        if (id == 0) revert Skipped();
        Batch memory b = _batch(id, o, secs, bytesSeed, greedy, split);
        bool ack = withAck && o.terms.ackSigner != address(0);
        // The bytes paid: what fits max(acknowledged, allowance) above the claimed bytes, where a
        // claim with an acknowledgment first records the wire total (never below the recorded one).
        uint256 acked = ack ? wire[id] : o.ackedBytes;
        uint256 bound_ = acked > o.terms.byteAllowance ? acked : o.terms.byteAllowance;
        uint256 room = bound_ > o.claimedBytes ? bound_ - o.claimedBytes : 0;
        uint256 paidBytes = b.total < room ? b.total : room;
        b.amount = uint256(b.paidSeconds) * o.terms.pricePerSecond + (paidBytes * o.terms.pricePerGiB) / GIB;
        bytes memory data = _claimCall(b, o, ack, split);
        try Party(payable(o.provider)).exec(address(m), 0, data) {
            ghostPaid[id] += b.amount;
            ghostSeconds[id] += b.paidSeconds;
            ghostBytes[id] += b.total;
            ghostPaidBytes[id] += paidBytes;
            if (paidBytes < b.total) calls["bytesTrimmed"]++;
            lastId = id;
            lastCall = data;
            calls[withAck ? bytes32("claimWithAck") : bytes32("claim")]++;
        } catch {
            revert Refused();
        }
    }

    struct Batch {
        uint256 id;
        bytes32 head;
        uint64 secs;
        uint64 bytesIn;
        uint64 bytesOut;
        uint256 total;
        /// What the contract should pay, by this handler's own reading of the rules (the amount is
        /// set by `claim`, which knows whether an acknowledgment rides along).
        uint64 paidSeconds;
        uint256 amount;
    }

    function _batch(uint256 id, Marketplace.Order memory o, uint256 secs, uint256 bytesSeed, bool greedy, uint256 split)
        internal
        returns (Batch memory b)
    {
        b.id = id;
        uint256 lease = _leaseSecondsSoFar(o);
        uint256 left = lease > o.claimedSeconds ? lease - o.claimedSeconds : 0;
        // Three in four batches fit the chain time; the others run past it (refused while the
        // lease runs, trimmed after its end).
        b.secs = uint64(secs % 4 == 0 ? bound(secs, 0, 2 * left + 10) : bound(secs, 0, left));
        if (greedy && bytesSeed % 2 == 0) {
            b.total = bound(bytesSeed, 0, 1 << 50);
        } else {
            uint256 room = wire[id] > o.claimedBytes ? wire[id] - o.claimedBytes : 0;
            b.total = bound(bytesSeed, 0, room);
        }
        b.bytesIn = uint64(bound(split, 0, b.total));
        b.bytesOut = uint64(b.total - b.bytesIn);
        b.head = bytes32(nextHead++);
        b.paidSeconds = b.secs <= left ? b.secs : uint64(left);
    }

    function _claimCall(Batch memory b, Marketplace.Order memory o, bool withAck, uint256 split)
        internal
        returns (bytes memory)
    {
        uint256[6] memory input = [
            m.orderKey(b.id), uint256(o.head), uint256(b.head), uint256(b.secs), uint256(b.bytesIn), uint256(b.bytesOut)
        ];
        bytes memory proof = verifier.proofFor(input);
        if (!withAck) {
            return abi.encodeCall(Marketplace.claim, (b.id, CAP, b.head, b.secs, b.bytesIn, b.bytesOut, proof));
        }
        (Marketplace.Acknowledgment memory ack, bytes memory sig) = _signedAck(b.id, type(uint256).max, split);
        return
            abi.encodeCall(
                Marketplace.claimWithAck, (b.id, CAP, b.head, b.secs, b.bytesIn, b.bytesOut, proof, ack, sig)
            );
    }

    /// The provider sends its last paid claim again, byte for byte.
    function replay() external {
        if (lastId == 0) revert Skipped();
        Marketplace.Order memory o = m.getOrder(lastId);
        try Party(payable(o.provider)).exec(address(m), 0, lastCall) {
            replaysPaid++;
        } catch {
            revert Refused();
        }
    }

    function settle(uint256 orderSeed, uint256 whoSeed) external {
        (uint256 id, Marketplace.Order memory o) = _pickIn(orderSeed, ENDED);
        if (id == 0) revert Skipped();
        uint256 w = whoSeed % 3;
        Party who =
            w == 0 ? Party(payable(o.provider)) : w == 1 ? Party(payable(o.client)) : actors[whoSeed % actors.length];
        try who.exec(address(m), 0, abi.encodeCall(Marketplace.settle, (id))) {
            settleCount[id]++;
            calls["settle"]++;
        } catch {
            revert Refused();
        }
    }

    function withdraw(uint256 actorSeed) external {
        Party who = actors[actorSeed % actors.length];
        // A bounded gas limit: a gas-burning receiver takes what it is given.
        try who.exec{gas: 500_000}(address(m), 0, abi.encodeCall(Marketplace.withdraw, ())) {
            calls["withdraw"]++;
        } catch {
            revert Refused();
        }
    }

    /// An actor starts or stops misbehaving when paid.
    function setMode(uint256 actorSeed, uint8 mode) external {
        actors[actorSeed % actors.length].setMode(Party.Mode(mode % 4));
        calls["setMode"]++;
    }

    function warp(uint256 dt) external {
        // Mostly seconds to minutes, sometimes past a lease and a claim window.
        dt = dt % 16 == 0 ? bound(dt, 1 hours, 4 hours) : bound(dt, 0, 5 minutes);
        vm.warp(block.timestamp + dt);
        calls["warp"]++;
    }

    // ------------------------------------------------------------ views for the invariants

    function orderIds() external view returns (uint256[] memory) {
        return ids;
    }

    function actorList() external view returns (Party[] memory) {
        return actors;
    }

    function leaseSecondsSoFar(uint256 id) external view returns (uint256) {
        return _leaseSecondsSoFar(m.getOrder(id));
    }

    // ------------------------------------------------------------ internals

    uint256 internal constant PENDING = 1 << uint256(Marketplace.OrderState.Pending);
    uint256 internal constant ACTIVE = 1 << uint256(Marketplace.OrderState.Active);
    uint256 internal constant ENDED = 1 << uint256(Marketplace.OrderState.Ended);

    /// An order, preferably one in one of `states` (a bit set): most calls then do something,
    /// and one in eight goes to any order to exercise the refusals.
    function _pickIn(uint256 seed, uint256 states) internal view returns (uint256 id, Marketplace.Order memory o) {
        if (seed % 8 == 0 && ids.length > 0) {
            id = ids[(seed / 8) % ids.length];
            return (id, m.getOrder(id));
        }
        uint256 n = live.length;
        if (n == 0) return (0, o);
        for (uint256 k = 0; k < n; k++) {
            uint256 candidate = live[(seed % n + k) % n];
            Marketplace.OrderState st = m.getOrder(candidate).state;
            if (states & (1 << uint256(st)) != 0) return (candidate, m.getOrder(candidate));
        }
        id = live[seed % n];
        o = m.getOrder(id);
    }

    /// Drops cancelled and settled orders from the live list.
    function _prune() internal {
        uint256 i = 0;
        while (i < live.length) {
            if (m.getOrder(live[i]).settled) {
                live[i] = live[live.length - 1];
                live.pop();
            } else {
                i++;
            }
        }
    }

    /// The lease's chain time so far, from getOrder's effective state (an expired order reads as
    /// Ended at its expiry).
    function _leaseSecondsSoFar(Marketplace.Order memory o) internal view returns (uint256) {
        if (o.acceptedAt == 0) return 0;
        uint256 end = o.state == Marketplace.OrderState.Ended ? o.endedAt : block.timestamp;
        uint256 expiry = uint256(o.acceptedAt) + o.terms.maxDuration;
        if (end > expiry) end = expiry;
        return end - o.acceptedAt;
    }

    /// An acknowledgment by the order's key of `share` of the wire bytes (all of them for
    /// share = max), split between in and out.
    function _signedAck(uint256 id, uint256 share, uint256 split)
        internal
        returns (Marketplace.Acknowledgment memory ack, bytes memory sig)
    {
        uint256 total = share == type(uint256).max ? wire[id] : bound(share, 0, wire[id]);
        uint64 bytesIn = uint64(bound(split, 0, total));
        ack = Marketplace.Acknowledgment({
            orderId: id, head: bytes32(nextHead), leaseSeconds: 0, bytesIn: bytesIn, bytesOut: uint64(total - bytesIn)
        });
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(ackKey[id], m.acknowledgmentDigest(ack));
        sig = abi.encodePacked(r, s, v);
        if (total > maxSigned[id]) maxSigned[id] = total;
    }
}

/// The money invariants, checked after every call of the handler.
contract InvariantsTest is Test {
    Handler internal handler;
    uint256 internal totalFunds;

    function setUp() public {
        vm.warp(1_700_000_000);
        handler = new Handler();
        totalFunds = _sumOfBalances();
    }

    /// Forge fuzzes only the handler (no forge-std here: this is the hook it reads).
    function targetContracts() public view returns (address[] memory targets) {
        targets = new address[](1);
        targets[0] = address(handler);
    }

    /// The contract holds exactly the live escrows, the posted collateral not yet returned and
    /// the deferred payments: no wei is created, lost or stuck.
    /// One campaign checks all three groups after every call (forge runs a campaign per
    /// invariant function, so one function gets three times the calls for the same time).
    function invariant_money() public view {
        _balanceIsEscrowPlusCollateralPlusOwed();
        _paidUsageStaysWithinTheRules();
        _nothingIsPaidTwice();
    }

    event log_named_uint(string key, uint256 val);

    /// Successful inner calls of the campaign's last run, per action (forge -vv prints them).
    function afterInvariant() public {
        string[14] memory names = [
            "createOrder",
            "accept",
            "cancel",
            "topUp",
            "terminate",
            "traffic",
            "acknowledge",
            "claim",
            "claimWithAck",
            "bytesTrimmed",
            "settle",
            "withdraw",
            "setMode",
            "warp"
        ];
        for (uint256 i = 0; i < names.length; i++) {
            emit log_named_uint(names[i], handler.calls(bytes32(bytes(names[i]))));
        }
    }

    function _balanceIsEscrowPlusCollateralPlusOwed() internal view {
        Marketplace m = handler.m();
        uint256[] memory ids = handler.orderIds();
        uint256 held;
        for (uint256 i = 0; i < ids.length; i++) {
            Marketplace.Order memory o = m.getOrder(ids[i]);
            held += o.escrow;
            if (o.acceptedAt != 0 && !o.settled) held += o.terms.collateral;
        }
        Party[] memory actors = handler.actorList();
        for (uint256 i = 0; i < actors.length; i++) {
            held += m.owed(address(actors[i]));
        }
        assertEq(address(m).balance, held, "balance = escrows + collateral + owed");
        assertEq(_sumOfBalances(), totalFunds, "ether is only moved, never made or lost");
    }

    /// For every order: seconds paid within the lease's chain time; bytes paid within
    /// max(acknowledged, allowance); acknowledged bytes only what the client signed, and the
    /// client signed only what its wire saw.
    function _paidUsageStaysWithinTheRules() internal view {
        Marketplace m = handler.m();
        uint256[] memory ids = handler.orderIds();
        for (uint256 i = 0; i < ids.length; i++) {
            uint256 id = ids[i];
            Marketplace.Order memory o = m.getOrder(id);
            assertLe(o.claimedSeconds, handler.leaseSecondsSoFar(id), "seconds within chain time");
            uint256 bound_ = o.ackedBytes > o.terms.byteAllowance ? o.ackedBytes : o.terms.byteAllowance;
            assertLe(handler.ghostPaidBytes(id), bound_, "paid bytes within max(acked, allowance)");
            assertLe(handler.ghostPaidBytes(id), o.claimedBytes, "paid bytes within the claimed ones");
            assertLe(o.ackedBytes, handler.maxSigned(id), "only signed totals are recorded");
            assertLe(handler.maxSigned(id), handler.wire(id), "the client signs what it counted");
            if (o.terms.ackSigner == address(0)) assertEq(o.ackedBytes, 0, "no key, no acknowledgment");
        }
    }

    /// Nothing is paid twice: the contract's totals are exactly the sum of the claims that
    /// succeeded, as this handler priced them; no replay was ever paid; no order settled twice;
    /// nothing paid more than was deposited.
    function _nothingIsPaidTwice() internal view {
        Marketplace m = handler.m();
        uint256[] memory ids = handler.orderIds();
        assertEq(handler.replaysPaid(), 0, "no replay paid");
        for (uint256 i = 0; i < ids.length; i++) {
            uint256 id = ids[i];
            Marketplace.Order memory o = m.getOrder(id);
            assertEq(o.paid, handler.ghostPaid(id), "paid = sum of successful claims");
            assertEq(o.claimedSeconds, handler.ghostSeconds(id), "seconds = sum of paid seconds");
            assertEq(o.claimedBytes, handler.ghostBytes(id), "bytes = sum of claimed bytes");
            if (o.settled) {
                assertEq(o.escrow, 0, "a settled order holds nothing");
                assertLe(o.paid, handler.deposited(id), "paid at most what was deposited");
            } else {
                assertEq(o.paid + o.escrow, handler.deposited(id), "paid + left = deposited");
            }
            assertLe(handler.settleCount(id), 1, "settled at most once");
        }
    }

    function _sumOfBalances() internal view returns (uint256 sum) {
        Party[] memory actors = handler.actorList();
        for (uint256 i = 0; i < actors.length; i++) {
            sum += address(actors[i]).balance;
        }
        sum += address(handler.m()).balance;
    }
}
