// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ITickVerifier} from "./ITickVerifier.sol";
import {ProviderRegistry} from "./ProviderRegistry.sol";

/// @title Shale marketplace: orders, escrow, collateral, metered claims and ratings.
///
/// A client creates an order naming a registered provider, the SHA-256 fingerprint of its SSH key,
/// resources, an optional dataset, a tariff and a maximum duration, and pays the escrow with the
/// call. The provider accepts by posting the collateral the order states. While the order is live
/// the provider claims metered usage with Groth16 proofs over its tick chain; each claim is paid
/// out of the escrow. Either side can terminate at any time; an order also ends by itself at
/// `acceptedAt + maxDuration`. After the end, the provider may still claim usage up to the end time
/// during `CLAIM_WINDOW`; then `settle` returns what is left of the escrow to the client and the
/// collateral to the provider (less any slash, see below). The client can rate the provider once.
///
/// Money rules (all amounts are integer wei; every rounding favours the client, who pays up front):
/// - Claim amount of a batch = `seconds * pricePerSecond + floor((bytesIn + bytesOut) * pricePerGiB / 2^30)`.
///   The byte charge is floored per batch, so a provider that claims in many small batches can
///   only lose wei, never gain them.
/// - Collateral slashing: when the *provider* terminates an order before it expires, it forfeits
///   the share of the collateral that matches the unserved share of the lease:
///   `slash = ceil(collateral * (expiresAt - endedAt) / maxDuration)`, paid to the client at
///   settlement. Terminations by the client and natural expiry return the whole collateral.
/// - Settlement pays every remaining wei: `escrow left + slash` to the client and
///   `collateral - slash` to the provider. Nothing stays in the contract after an order settles.
/// - A payment to an address that refuses ether (a reverting contract) is not lost and does not
///   block the other party: it is credited to `owed[address]` and can be pulled with `withdraw()`.
contract Marketplace is ProviderRegistry {
    /// Lifecycle of an order. `Ended` covers termination by either side and natural expiry
    /// (an Active order past `acceptedAt + maxDuration` reads as Ended from every view).
    enum OrderState {
        Pending,
        Active,
        Ended,
        Cancelled
    }

    /// What a client asks for when it creates an order; the provider agrees to it by accepting.
    struct Terms {
        /// SHA-256 of the client's SSH public key blob (what `ssh-keygen -lf` prints, base64).
        bytes32 keyFingerprint;
        // cpus, memoryMiB, diskMiB, gpus and maxDuration fill one storage slot (4 + 8 + 8 + 4 + 8
        // bytes); acceptTimeout starts a second one with 24 bytes to spare for later small
        // fields. The disk costs createOrder that one extra slot whichever field spills over;
        // acceptTimeout is the one because only `cancel` reads it, while maxDuration, read by
        // every claim and state check, stays in the first slot.
        uint32 cpus;
        uint64 memoryMiB;
        /// Disk the order's container may write (root filesystem changes, /work): at least 1 MiB,
        /// at most the provider's `offer.maxDiskMiB` when the order is created.
        uint64 diskMiB;
        uint32 gpus;
        uint64 maxDuration;
        /// Seconds after creation from which the client may cancel if nobody accepted.
        uint64 acceptTimeout;
        /// Dataset id of the provider's registry entry; empty for none.
        string datasetId;
        uint256 pricePerSecond;
        uint256 pricePerGiB;
        /// Collateral the provider must post to accept (e.g. a fraction of the escrow).
        uint256 collateral;
    }

    /// An order. `escrow` is what is left of the client's payment. Fields are ordered so that
    /// storage packs them: creating an order writes as few slots as possible.
    struct Order {
        /// Filled in by `getOrder`; not stored (it is the mapping key).
        uint256 id;
        address client;
        OrderState state;
        uint64 createdAt;
        address provider;
        uint64 acceptedAt;
        Terms terms;
        uint256 escrow;
        /// Who ended the order: client or provider; address(0) for expiry or while live.
        address endedBy;
        /// Termination time, or the expiry time once the order expired; 0 while live.
        uint64 endedAt;
        bool settled;
        bool rated;
        uint64 claimedSeconds;
        uint128 claimedBytes;
        /// Total paid to the provider by claims.
        uint256 paid;
        /// Last paid tick-chain commitment (0 before the first claim).
        bytes32 head;
    }

    /// Longest lease and longest accept timeout an order may ask for. Bounding them keeps every
    /// `timestamp + duration` far inside uint64, so no order can be bricked by an overflow.
    uint64 public constant MAX_DURATION_LIMIT = 10 * 365 days;
    /// Time after the end of an order during which the provider may still claim usage.
    uint64 public constant CLAIM_WINDOW = 1 days;
    /// The BN254 scalar field order: every public input of a tick proof must be below it.
    uint256 public constant SNARK_SCALAR_FIELD =
        21888242871839275222246405745257275088548364400416264131440446208835329769473;
    uint256 private constant GIB = 1 << 30;

    uint256 public orderCount;
    mapping(uint256 => Order) private _orders;
    /// Payments that could not be pushed (the receiver reverted); pull them with `withdraw()`.
    mapping(address => uint256) public owed;

    /// Verifier per batch capacity, fixed at deployment: nobody can swap in a permissive verifier.
    mapping(uint32 => ITickVerifier) private _verifiers;
    uint32[] private _capacities;
    uint256 private _lock = 1;

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
    event OrderToppedUp(uint256 indexed orderId, uint256 amount, uint256 escrow);
    event OrderTerminated(uint256 indexed orderId, address indexed by, uint64 endedAt);
    event Claimed(
        uint256 indexed orderId,
        bytes32 head,
        uint64 seconds_,
        uint64 bytesIn,
        uint64 bytesOut,
        uint256 amount,
        uint256 escrowLeft
    );
    event OrderSettled(uint256 indexed orderId, uint256 refund, uint256 collateralReturned, uint256 collateralSlashed);
    event Rated(uint256 indexed orderId, address indexed provider, uint8 stars, string review);
    event PaymentDeferred(address indexed to, uint256 amount);
    event Withdrawn(address indexed to, uint256 amount);

    error VerifierConfigMismatch(uint256 capacities, uint256 verifiers);
    error InvalidVerifier(uint32 capacity);
    error OrderNotFound(uint256 orderId);
    error NotClient(uint256 orderId, address caller);
    error NotProvider(uint256 orderId, address caller);
    error NotParty(uint256 orderId, address caller);
    error OrderNotPending(uint256 orderId, OrderState state);
    error OrderNotActive(uint256 orderId, OrderState state);
    error OrderNotEnded(uint256 orderId, OrderState state);
    error AcceptTimeoutNotReached(uint256 orderId, uint64 cancellableAt);
    error WrongCollateral(uint256 orderId, uint256 required, uint256 sent);
    error ZeroEscrow();
    error ZeroDuration();
    error DurationTooLong(uint64 duration, uint64 max);
    error ZeroFingerprint();
    error DiskTooSmall(uint64 diskMiB, uint64 minDiskMiB);
    error DiskTooLarge(uint64 diskMiB, uint64 maxDiskMiB);
    error ZeroAmount();
    error UnknownBatchCapacity(uint32 capacity);
    error HeadOutOfField(bytes32 head);
    error CommitmentAlreadyPaid(uint256 orderId, bytes32 head);
    error InvalidProof(uint256 orderId);
    error ClaimExceedsLeaseTime(uint256 orderId, uint64 claimedSeconds, uint64 allowedSeconds);
    error ClaimExceedsEscrow(uint256 orderId, uint256 amount, uint256 escrowLeft);
    error AlreadySettled(uint256 orderId);
    error ClaimWindowOpen(uint256 orderId, uint64 settleableAt);
    error AlreadyRated(uint256 orderId);
    error InvalidStars(uint8 stars);
    error NothingOwed(address account);
    error TransferFailed(address to, uint256 amount);
    error Reentrancy();

    modifier nonReentrant() {
        if (_lock != 1) revert Reentrancy();
        _lock = 2;
        _;
        _lock = 1;
    }

    constructor(uint32[] memory batchCapacities, ITickVerifier[] memory verifiers) {
        if (batchCapacities.length != verifiers.length) {
            revert VerifierConfigMismatch(batchCapacities.length, verifiers.length);
        }
        for (uint256 i = 0; i < batchCapacities.length; i++) {
            uint32 capacity = batchCapacities[i];
            if (capacity == 0 || address(verifiers[i]) == address(0) || address(_verifiers[capacity]) != address(0)) {
                revert InvalidVerifier(capacity);
            }
            _verifiers[capacity] = verifiers[i];
            _capacities.push(capacity);
        }
    }

    // ---------------------------------------------------------------- views

    /// The batch capacities this deployment verifies, in constructor order.
    function supportedCapacities() external view returns (uint32[] memory) {
        return _capacities;
    }

    /// The verifier for a batch capacity (address(0) when none).
    function verifierFor(uint32 capacity) external view returns (ITickVerifier) {
        return _verifiers[capacity];
    }

    /// An order with its effective state: an Active order past its expiry reads as Ended with
    /// `endedAt` = expiry time.
    function getOrder(uint256 orderId) external view returns (Order memory order) {
        Order storage o = _order(orderId);
        order = o;
        order.id = orderId;
        order.state = _stateOf(o);
        if (order.state == OrderState.Ended && o.state == OrderState.Active) {
            order.endedAt = _expiresAt(o);
        }
    }

    /// The effective state of an order.
    function orderState(uint256 orderId) external view returns (OrderState) {
        return _stateOf(_order(orderId));
    }

    /// When an accepted order expires (0 while Pending or Cancelled).
    function expiresAt(uint256 orderId) external view returns (uint64) {
        Order storage o = _order(orderId);
        return o.acceptedAt == 0 ? 0 : _expiresAt(o);
    }

    /// Seconds the provider may still claim right now: the lease's wall-clock time so far
    /// (to now, or to the end) minus what was already claimed.
    function claimableSeconds(uint256 orderId) external view returns (uint64) {
        Order storage o = _order(orderId);
        OrderState s = _stateOf(o);
        if (s != OrderState.Active && s != OrderState.Ended) return 0;
        return _leaseSecondsSoFar(o) - o.claimedSeconds;
    }

    /// Amount a batch would cost under the order's tariff (see the rounding rule above).
    function quote(uint256 orderId, uint64 leaseSeconds, uint64 bytesIn, uint64 bytesOut)
        external
        view
        returns (uint256)
    {
        Order storage o = _order(orderId);
        return _charge(o, leaseSeconds, bytesIn, bytesOut);
    }

    // ---------------------------------------------------------------- client side

    /// Creates an order with `provider` on `terms`; the call's value is the escrow.
    /// Returns the new order id (ids start at 1).
    function createOrder(address provider, Terms calldata terms) external payable returns (uint256 orderId) {
        if (msg.value == 0) revert ZeroEscrow();
        if (terms.maxDuration == 0) revert ZeroDuration();
        if (terms.maxDuration > MAX_DURATION_LIMIT) revert DurationTooLong(terms.maxDuration, MAX_DURATION_LIMIT);
        if (terms.acceptTimeout > MAX_DURATION_LIMIT) revert DurationTooLong(terms.acceptTimeout, MAX_DURATION_LIMIT);
        if (terms.keyFingerprint == bytes32(0)) revert ZeroFingerprint();
        Provider storage p = _provider(provider);
        if (!p.active) revert ProviderInactive(provider);
        if (terms.diskMiB < MIN_DISK_MIB) revert DiskTooSmall(terms.diskMiB, MIN_DISK_MIB);
        if (terms.diskMiB > p.offer.maxDiskMiB) revert DiskTooLarge(terms.diskMiB, p.offer.maxDiskMiB);
        if (bytes(terms.datasetId).length != 0) _requireDataset(provider, terms.datasetId);

        orderId = ++orderCount;
        Order storage o = _orders[orderId];
        o.client = msg.sender;
        o.provider = provider;
        o.terms = terms;
        o.escrow = msg.value;
        o.state = OrderState.Pending;
        o.createdAt = uint64(block.timestamp);
        emit OrderCreated(orderId, msg.sender, provider, msg.value, terms.collateral, terms.datasetId);
    }

    /// Adds escrow to a Pending or live Active order (the meter tops up to keep a session going).
    function topUp(uint256 orderId) external payable {
        Order storage o = _order(orderId);
        if (msg.sender != o.client) revert NotClient(orderId, msg.sender);
        if (msg.value == 0) revert ZeroAmount();
        OrderState s = _stateOf(o);
        if (s != OrderState.Pending && s != OrderState.Active) revert OrderNotActive(orderId, s);
        o.escrow += msg.value;
        emit OrderToppedUp(orderId, msg.value, o.escrow);
    }

    /// Cancels a Pending order with a full refund of the escrow. The client may cancel once
    /// `createdAt + acceptTimeout` has passed; the provider may decline at any time.
    function cancel(uint256 orderId) external nonReentrant {
        Order storage o = _order(orderId);
        if (msg.sender != o.client && msg.sender != o.provider) revert NotParty(orderId, msg.sender);
        if (o.state != OrderState.Pending) revert OrderNotPending(orderId, _stateOf(o));
        if (msg.sender == o.client) {
            uint64 cancellableAt = o.createdAt + o.terms.acceptTimeout;
            if (block.timestamp < cancellableAt) revert AcceptTimeoutNotReached(orderId, cancellableAt);
        }
        uint256 refund = o.escrow;
        o.escrow = 0;
        o.state = OrderState.Cancelled;
        o.endedAt = uint64(block.timestamp);
        o.endedBy = msg.sender;
        o.settled = true;
        emit OrderCancelled(orderId, msg.sender, refund);
        _pay(o.client, refund);
    }

    /// Rates the provider of an ended order, once: 1 to 5 stars and a short review (<= 280 bytes).
    function rate(uint256 orderId, uint8 stars, string calldata review) external {
        Order storage o = _order(orderId);
        if (msg.sender != o.client) revert NotClient(orderId, msg.sender);
        OrderState s = _stateOf(o);
        if (s != OrderState.Ended) revert OrderNotEnded(orderId, s);
        if (o.rated) revert AlreadyRated(orderId);
        if (stars < 1 || stars > 5) revert InvalidStars(stars);
        if (bytes(review).length > MAX_REVIEW) revert TooLong("review", bytes(review).length, MAX_REVIEW);
        o.rated = true;
        _addRating(o.provider, stars);
        emit Rated(orderId, o.provider, stars, review);
    }

    // ---------------------------------------------------------------- provider side

    /// Accepts a Pending order; the call's value must equal the order's collateral exactly.
    function accept(uint256 orderId) external payable {
        Order storage o = _order(orderId);
        if (msg.sender != o.provider) revert NotProvider(orderId, msg.sender);
        if (o.state != OrderState.Pending) revert OrderNotPending(orderId, o.state);
        if (msg.value != o.terms.collateral) revert WrongCollateral(orderId, o.terms.collateral, msg.value);
        o.state = OrderState.Active;
        o.acceptedAt = uint64(block.timestamp);
        emit OrderAccepted(orderId, msg.sender, msg.value, _expiresAt(o));
    }

    /// Terminates a live order; either side may. Usage up to now stays claimable for CLAIM_WINDOW.
    function terminate(uint256 orderId) external {
        Order storage o = _order(orderId);
        if (msg.sender != o.client && msg.sender != o.provider) revert NotParty(orderId, msg.sender);
        OrderState s = _stateOf(o);
        if (s != OrderState.Active) revert OrderNotActive(orderId, s);
        o.state = OrderState.Ended;
        o.endedAt = uint64(block.timestamp);
        o.endedBy = msg.sender;
        emit OrderTerminated(orderId, msg.sender, o.endedAt);
    }

    /// Claims metered usage for one proven batch of ticks and pays it to the provider.
    /// `leaseSeconds`, `bytesIn`, `bytesOut` are the batch totals the proof commits to; the proof
    /// links the order's stored head to `nextHead`.
    function claim(
        uint256 orderId,
        uint32 batchCapacity,
        bytes32 nextHead,
        uint64 leaseSeconds,
        uint64 bytesIn,
        uint64 bytesOut,
        bytes calldata proof
    ) external nonReentrant {
        Order storage o = _order(orderId);
        if (msg.sender != o.provider) revert NotProvider(orderId, msg.sender);
        OrderState s = _stateOf(o);
        if (s != OrderState.Active && s != OrderState.Ended) revert OrderNotActive(orderId, s);
        if (o.settled) revert AlreadySettled(orderId);
        if (nextHead == o.head) revert CommitmentAlreadyPaid(orderId, nextHead);
        if (uint256(nextHead) >= SNARK_SCALAR_FIELD) revert HeadOutOfField(nextHead);
        _verify(orderId, o, batchCapacity, nextHead, leaseSeconds, bytesIn, bytesOut, proof);

        uint64 allowed = _leaseSecondsSoFar(o);
        uint64 total = o.claimedSeconds + leaseSeconds;
        if (total > allowed) revert ClaimExceedsLeaseTime(orderId, total, allowed);
        uint256 amount = _charge(o, leaseSeconds, bytesIn, bytesOut);
        if (amount > o.escrow) revert ClaimExceedsEscrow(orderId, amount, o.escrow);

        o.escrow -= amount;
        o.paid += amount;
        o.claimedSeconds = total;
        o.claimedBytes += uint128(bytesIn) + uint128(bytesOut);
        o.head = nextHead;
        emit Claimed(orderId, nextHead, leaseSeconds, bytesIn, bytesOut, amount, o.escrow);
        _pay(o.provider, amount);
    }

    /// Closes an ended order's books: the rest of the escrow (plus any slash) to the client, the
    /// collateral (less any slash) to the provider. Anyone may settle once the claim window is
    /// over; the provider may settle earlier, which gives up its remaining claims.
    function settle(uint256 orderId) external nonReentrant {
        Order storage o = _order(orderId);
        OrderState s = _stateOf(o);
        if (s != OrderState.Ended) revert OrderNotEnded(orderId, s);
        if (o.settled) revert AlreadySettled(orderId);
        if (o.state == OrderState.Active) {
            // Expired without a termination: pin the end to the expiry time.
            o.state = OrderState.Ended;
            o.endedAt = _expiresAt(o);
        }
        if (msg.sender != o.provider) {
            uint64 settleableAt = o.endedAt + CLAIM_WINDOW;
            if (block.timestamp < settleableAt) revert ClaimWindowOpen(orderId, settleableAt);
        }
        uint256 slash = collateralSlash(
            o.terms.collateral, o.terms.maxDuration, _expiresAt(o) - o.endedAt, o.endedBy == o.provider
        );
        uint256 refund = o.escrow;
        uint256 collateralBack = o.terms.collateral - slash;
        o.escrow = 0;
        o.settled = true;
        emit OrderSettled(orderId, refund, collateralBack, slash);
        _pay(o.client, refund + slash);
        _pay(o.provider, collateralBack);
    }

    /// The collateral slashing rule: an early termination by the provider forfeits
    /// `ceil(collateral * unservedSeconds / maxDuration)`; anything else forfeits nothing.
    function collateralSlash(uint256 collateral, uint64 maxDuration, uint64 unservedSeconds, bool byProvider)
        public
        pure
        returns (uint256)
    {
        if (!byProvider || unservedSeconds == 0 || collateral == 0) return 0;
        uint256 num = collateral * unservedSeconds;
        return num / maxDuration + (num % maxDuration == 0 ? 0 : 1);
    }

    /// Pulls payments that could not be pushed to the caller.
    function withdraw() external nonReentrant {
        uint256 amount = owed[msg.sender];
        if (amount == 0) revert NothingOwed(msg.sender);
        owed[msg.sender] = 0;
        emit Withdrawn(msg.sender, amount);
        (bool ok,) = msg.sender.call{value: amount}("");
        if (!ok) revert TransferFailed(msg.sender, amount);
    }

    // ---------------------------------------------------------------- internals

    function _order(uint256 orderId) private view returns (Order storage o) {
        o = _orders[orderId];
        if (o.client == address(0)) revert OrderNotFound(orderId);
    }

    function _expiresAt(Order storage o) private view returns (uint64) {
        return o.acceptedAt + o.terms.maxDuration;
    }

    function _stateOf(Order storage o) private view returns (OrderState) {
        if (o.state == OrderState.Active && block.timestamp >= _expiresAt(o)) return OrderState.Ended;
        return o.state;
    }

    /// Wall-clock seconds of the lease so far: from acceptance to now, or to the end.
    function _leaseSecondsSoFar(Order storage o) private view returns (uint64) {
        uint64 end = uint64(block.timestamp);
        if (o.state == OrderState.Ended) end = o.endedAt;
        uint64 expiry = _expiresAt(o);
        if (end > expiry) end = expiry;
        return end - o.acceptedAt;
    }

    function _charge(Order storage o, uint64 leaseSeconds, uint64 bytesIn, uint64 bytesOut)
        private
        view
        returns (uint256)
    {
        uint256 bytesMoved = uint256(bytesIn) + uint256(bytesOut);
        return uint256(leaseSeconds) * o.terms.pricePerSecond + (bytesMoved * o.terms.pricePerGiB) / GIB;
    }

    function _verify(
        uint256 orderId,
        Order storage o,
        uint32 batchCapacity,
        bytes32 nextHead,
        uint64 leaseSeconds,
        uint64 bytesIn,
        uint64 bytesOut,
        bytes calldata proof
    ) private view {
        ITickVerifier verifier = _verifiers[batchCapacity];
        if (address(verifier) == address(0)) revert UnknownBatchCapacity(batchCapacity);
        uint256[6] memory input =
            [orderId, uint256(o.head), uint256(nextHead), uint256(leaseSeconds), uint256(bytesIn), uint256(bytesOut)];
        if (!verifier.verifyClaim(input, proof)) revert InvalidProof(orderId);
    }

    /// Pushes ether; a receiver that refuses it gets the amount credited to `owed` instead, so one
    /// party can never block the other's payout.
    function _pay(address to, uint256 amount) private {
        if (amount == 0) return;
        (bool ok,) = to.call{value: amount}("");
        if (!ok) {
            owed[to] += amount;
            emit PaymentDeferred(to, amount);
        }
    }
}
