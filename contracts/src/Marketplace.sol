// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {EIP712} from "./EIP712.sol";
import {ITickVerifier} from "./ITickVerifier.sol";
import {ProviderRegistry} from "./ProviderRegistry.sol";

/// @title Shale marketplace: orders, escrow, collateral, metered claims and ratings.
///
/// A client creates an order naming a registered provider, the SHA-256 fingerprint of its SSH key,
/// its acknowledgment key, resources, an optional dataset, a tariff, a byte allowance and a maximum
/// duration, and pays the escrow with the call. The provider accepts, before the accept timeout, by
/// posting the collateral the order states. While the order is live the provider claims metered
/// usage with Groth16 proofs over its tick chain; each claim is paid out of the escrow. Either side
/// can terminate at any time; an order also ends by itself at `acceptedAt + maxDuration`. After the
/// end, the provider may still claim usage up to the end time during `CLAIM_WINDOW` (a deployment
/// parameter); then `settle` returns what is left of the escrow to the client and the collateral to
/// the provider (less any slash, see below). The client can rate the provider once, if it paid.
///
/// What a claim may be paid for (for every order, always; a proof alone proves only that the SP's
/// own tick log is self-consistent, so these bounds are what keep a forged or dishonest log from
/// taking the escrow):
/// - cumulative seconds paid <= the lease's chain time (acceptance to now, or to the end);
/// - cumulative bytes paid (in + out) <= max(the largest cumulative byte total the client's
///   acknowledgment key signed, `terms.byteAllowance`);
/// - the amount <= the escrow left.
/// Acknowledgments are EIP-712 signatures by `terms.ackSigner` over
/// `Acknowledgment(orderId, head, seconds, bytesIn, bytesOut)` under the domain
/// ("Shale Marketplace", "1", chain id, this contract), recorded by `acknowledge` or `claimWithAck`.
///
/// Money rules (all amounts are integer wei; every rounding favours the client, who pays up front):
/// - Claim amount of a batch = `seconds * pricePerSecond + floor((bytesIn + bytesOut) * pricePerGiB / 2^30)`.
///   The byte charge is floored per batch, so a provider that claims in many small batches can
///   only lose wei, never gain them. Prices are at most `MAX_PRICE` (2^128 - 1, the meter's bound),
///   so no charge can overflow.
/// - A batch that runs past the end of an ended lease is paid up to the end (its seconds are
///   trimmed), so an honest provider's last batch is not lost.
/// - A batch is never refused for its bytes: ticks are proved whole, so a few unacknowledged bytes
///   must not block the seconds after them. It pays all its (chain-time bounded) seconds and, of
///   its bytes, only `min(batch bytes, max(acknowledged, allowance) - bytes claimed so far)`; the
///   rest is forfeited for good (`BytesTrimmed`) and still counts as claimed.
/// - Collateral slashing: when the *provider* terminates an order before it expires, it forfeits
///   the share of the collateral that matches the unserved share of the lease:
///   `slash = ceil(collateral * (expiresAt - endedAt) / maxDuration)`, paid to the client at
///   settlement. Terminations by the client and natural expiry return the whole collateral.
/// - Settlement pays every remaining wei: `escrow left + slash` to the client and
///   `collateral - slash` to the provider. Nothing stays in the contract after an order settles.
/// - A payment is pushed with the call's bounded stipend (a `transfer`-style call: 2300 gas on the
///   EVM; FEVM recognises the pattern and grants its own fixed amount) without copying any return
///   data. A receiver that refuses it, burns the stipend or answers with a "return bomb" is not
///   paid then and cannot block the other party: the amount is credited to `owed[address]` and
///   pulled with `withdraw()`, which forwards all the caller's gas.
contract Marketplace is EIP712 {
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
        // ackSigner and byteAllowance share one storage slot (20 + 8 bytes): `acknowledge` reads
        // the signer, every claim the allowance.
        /// The client's per-order acknowledgment key (an address): only its EIP-712
        /// acknowledgments raise the bytes a claim may be paid for. address(0): no
        /// acknowledgments; the provider is paid for at most `byteAllowance` bytes.
        address ackSigner;
        /// Bytes (in + out, cumulative) the provider may be paid for without an acknowledgment.
        uint64 byteAllowance;
        // cpus, memoryMiB, diskMiB, gpus and maxDuration fill one storage slot (4 + 8 + 8 + 4 + 8
        // bytes), read by every claim and state check; acceptTimeout, read only by `accept` and
        // `cancel`, has a slot of its own with 24 bytes to spare for later small fields.
        uint32 cpus;
        uint64 memoryMiB;
        /// Disk the order's container may write (root filesystem changes, /work): at least 1 MiB,
        /// at most the provider's `offer.maxDiskMiB` when the order is created.
        uint64 diskMiB;
        uint32 gpus;
        uint64 maxDuration;
        /// Seconds after creation during which the provider may accept, and from which the
        /// client may cancel if nobody did. Never 0.
        uint64 acceptTimeout;
        /// Dataset id of the provider's registry entry; empty for none.
        string datasetId;
        /// SHA-256 of the OCI manifest or index of the image the order runs: one of the
        /// provider's catalog digests (`getImages`), or 0 for the provider's built-in default
        /// when its catalog is empty.
        bytes32 imageDigest;
        uint256 pricePerSecond;
        uint256 pricePerGiB;
        /// Collateral the provider must post to accept (e.g. a fraction of the escrow).
        uint256 collateral;
        /// Empty for a catalog image. Otherwise the client brings its own image: the repository
        /// (`HOST/PATH`, no tag or digest) it is pulled from as `imageRepository@sha256:<imageDigest>`,
        /// on one of the registries the provider allows (`ProviderRegistry.clientImageRegistries`).
        string imageRepository;
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
        // claimedSeconds, claimedBytes and ackedBytes share one slot (8 + 12 + 12 bytes): a claim
        // with an acknowledgment reads and writes them together. An acknowledgment's total is
        // below 2^65; claimed bytes saturate at 2^96 - 1 (far past any bound they are compared to).
        /// Seconds paid so far (cumulative, trimmed at the lease's end).
        uint64 claimedSeconds;
        /// Bytes (in + out) claimed so far (cumulative): every proved byte, whether it was paid or,
        /// past max(acknowledged, allowance), forfeited (`BytesTrimmed`). Paid bytes never exceed
        /// max(acknowledged, allowance).
        uint96 claimedBytes;
        /// The largest cumulative byte total (bytesIn + bytesOut) the ack signer acknowledged.
        uint96 ackedBytes;
        /// Total paid to the provider by claims.
        uint256 paid;
        /// Last paid tick-chain commitment (0 before the first claim).
        bytes32 head;
        /// The tick-chain head of the recorded acknowledgment (0 before the first).
        bytes32 ackedHead;
    }

    /// How an order is stored (`getOrder` returns it as an `Order`). The claim path reads slots 0-6
    /// and writes 4-7, nothing else: every field a claim or acknowledgment needs sits in them,
    /// narrowed to its proven bound (prices <= MAX_PRICE = 2^128 - 1; escrow and paid are wei of a
    /// supply far below 2^128; durations and claimed seconds <= MAX_DURATION_LIMIT < 2^32; acknowledged
    /// byte totals < 2^65; claimed bytes saturate at 2^96 - 1). Slots 5-7 are non-zero from `createOrder` / `accept` on (maxDuration >= 1, heads
    /// carry `MARK`), so a first claim updates slots instead of creating them (5,000 gas, not 20,000).
    struct Record {
        // slot 0
        address client;
        OrderState state;
        bool settled;
        bool rated;
        uint64 endedAt;
        // slot 1
        address provider;
        uint64 acceptedAt;
        // slot 2
        address ackSigner;
        uint64 byteAllowance;
        // slot 3
        uint128 pricePerSecond;
        uint128 pricePerGiB;
        // slot 4
        uint128 escrow;
        uint128 paid;
        // slot 5
        uint32 maxDuration;
        uint32 claimedSeconds;
        uint96 claimedBytes;
        uint96 ackedBytes;
        // slots 6, 7: `MARK | head` (tick-chain heads are field elements, below 2^254)
        uint256 head;
        uint256 ackedHead;
        // read off the claim path
        address endedBy;
        uint64 createdAt;
        uint32 cpus;
        uint32 gpus;
        uint64 memoryMiB;
        uint64 diskMiB;
        uint64 acceptTimeout;
        bytes32 keyFingerprint;
        uint256 collateral;
        bytes32 imageDigest;
        string datasetId;
        string imageRepository;
    }

    /// What the client's acknowledgment key signs (EIP-712, see `ACKNOWLEDGMENT_TYPEHASH`): the
    /// order, the SP's tick-chain head it recomputed and the cumulative totals at that head.
    /// The EIP-712 type names the third field `seconds`; Solidity reserves that word, so here
    /// (and in the ABI) it is `leaseSeconds`. The digest depends only on the type string.
    struct Acknowledgment {
        uint256 orderId;
        bytes32 head;
        uint64 leaseSeconds;
        uint64 bytesIn;
        uint64 bytesOut;
    }

    /// Longest lease and longest accept timeout an order may ask for. Bounding them keeps every
    /// `timestamp + duration` far inside uint64, so no order can be bricked by an overflow.
    uint64 internal constant MAX_DURATION_LIMIT = 10 * 365 days;
    /// Time after the end of an order during which the provider may still claim usage; set at
    /// deployment (at least 1 second, at most `MAX_DURATION_LIMIT`).
    uint64 public immutable CLAIM_WINDOW;
    /// Providers, their offers, datasets and images: what orders are checked against.
    ProviderRegistry public immutable registry;
    /// The smallest disk an order may have: the registry's `MIN_DISK_MIB`.
    uint64 public constant MIN_DISK_MIB = 32;
    /// The longest review a rating may carry.
    uint256 internal constant MAX_REVIEW = 280;
    /// The largest price per second and per GiB an order may state: the meter's `MAX_PRICE`, so
    /// that every price the contract accepts is one the gateway can charge. Below it no charge
    /// can overflow: seconds < 2^64 and bytes < 2^66 keep every batch under 2^195 wei.
    uint256 internal constant MAX_PRICE = type(uint128).max;
    /// keccak256 of the EIP-712 type of an acknowledgment.
    bytes32 internal constant ACKNOWLEDGMENT_TYPEHASH =
        keccak256("Acknowledgment(uint256 orderId,bytes32 head,uint64 seconds,uint64 bytesIn,uint64 bytesOut)");
    /// The BN254 scalar field order: every public input of a tick proof must be below it.
    uint256 internal constant SNARK_SCALAR_FIELD =
        21888242871839275222246405745257275088548364400416034343698204186575808495617;
    uint256 private constant GIB = 1 << 30;
    /// The longest reason (bytes of UTF-8) a provider may give when it declines an order.
    uint256 internal constant MAX_DECLINE_REASON = 200;
    /// Set in a stored head: the slot is never zero after `accept`, whatever the head.
    uint256 private constant MARK = 1 << 255;

    uint256 public orderCount;
    mapping(uint256 => Record) private _orders;
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
    /// The provider declined the Pending order (`OrderCancelled` follows in the same call).
    event OrderDeclined(uint256 indexed orderId, string reason);
    event OrderToppedUp(uint256 indexed orderId, uint256 amount, uint256 escrow);
    event OrderTerminated(uint256 indexed orderId, address indexed by, uint64 endedAt);
    /// `seconds_` is what was paid: the batch's seconds, trimmed at the end of an ended lease
    /// (then `ClaimTrimmed` says by how much). `bytesIn` and `bytesOut` are the proved bytes; those
    /// past max(acknowledged, allowance) are not in `amount` (then `BytesTrimmed` says how many).
    event Claimed(
        uint256 indexed orderId,
        bytes32 head,
        uint64 seconds_,
        uint64 bytesIn,
        uint64 bytesOut,
        uint256 amount,
        uint256 escrowLeft
    );
    /// The last batch of an ended lease proved more seconds than the lease had left.
    event ClaimTrimmed(uint256 indexed orderId, uint64 provenSeconds, uint64 paidSeconds);
    /// The batch proved more bytes than max(acknowledged, allowance) still covers: `paidBytes` of
    /// its `provenBytes` were paid, the rest is forfeited.
    event BytesTrimmed(uint256 indexed orderId, uint256 provenBytes, uint256 paidBytes);
    /// An acknowledgment was recorded: claims may now be paid for up to `bytesIn + bytesOut` bytes.
    event Acknowledged(uint256 indexed orderId, bytes32 head, uint64 seconds_, uint64 bytesIn, uint64 bytesOut);
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
    error AcceptTimeoutPassed(uint256 orderId, uint64 acceptDeadline);
    error ZeroAcceptTimeout();
    error SelfOrder(address provider);
    error PriceTooHigh(uint256 price, uint256 max);
    error InvalidClaimWindow(uint64 claimWindow);
    error WrongCollateral(uint256 orderId, uint256 required, uint256 sent);
    error ZeroEscrow();
    error ZeroDuration();
    error DurationTooLong(uint64 duration, uint64 max);
    error ZeroFingerprint();
    error DiskTooSmall(uint64 diskMiB, uint64 minDiskMiB);
    error DiskTooLarge(uint64 diskMiB, uint64 maxDiskMiB);
    error ZeroAmount();
    /// A payment that does not fit the 128 bits an order's escrow is stored in.
    error AmountTooLarge(uint256 amount);
    error UnknownBatchCapacity(uint32 capacity);
    error HeadOutOfField(bytes32 head);
    error CommitmentAlreadyPaid(uint256 orderId, bytes32 head);
    error InvalidProof(uint256 orderId);
    error ClaimExceedsLeaseTime(uint256 orderId, uint64 claimedSeconds, uint64 allowedSeconds);
    error ClaimExceedsEscrow(uint256 orderId, uint256 amount, uint256 escrowLeft);
    error AckForAnotherOrder(uint256 orderId, uint256 ackOrderId);
    error NoAckSigner(uint256 orderId);
    /// The signature is malformed, malleable (high s) or by another key (`recovered`, 0 if none).
    error InvalidAckSignature(uint256 orderId, address ackSigner, address recovered);
    /// The acknowledgment's byte total is below the one already recorded.
    error AckOlderThanRecorded(uint256 orderId, uint256 ackBytes, uint256 recordedBytes);
    error AlreadySettled(uint256 orderId);
    error ClaimWindowOpen(uint256 orderId, uint64 settleableAt);
    error AlreadyRated(uint256 orderId);
    error NothingPaid(uint256 orderId);
    error InvalidStars(uint8 stars);
    error NothingOwed(address account);
    error TransferFailed(address to, uint256 amount);
    error Reentrancy();
    error TooLong(string field, uint256 length, uint256 max);

    function _eip712Strings() internal pure override returns (string memory, string memory) {
        return ("Shale Marketplace", "1");
    }

    // The guard's body is in functions, not inlined in every guarded function: runtime size.
    modifier nonReentrant() {
        _enter();
        _;
        _lock = 1;
    }

    /// `claimWindow`: seconds after an order's end during which its provider may still claim.
    /// Deploys the provider registry this marketplace orders from (`registry`).
    constructor(uint32[] memory batchCapacities, ITickVerifier[] memory verifiers, uint64 claimWindow)
        EIP712("Shale Marketplace", "1")
    {
        registry = new ProviderRegistry();
        if (claimWindow == 0 || claimWindow > MAX_DURATION_LIMIT) revert InvalidClaimWindow(claimWindow);
        CLAIM_WINDOW = claimWindow;
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
        Record storage o = _order(orderId);
        order.id = orderId;
        order.client = o.client;
        order.state = _stateOf(o);
        order.createdAt = o.createdAt;
        order.provider = o.provider;
        order.acceptedAt = o.acceptedAt;
        Terms memory t = order.terms;
        t.keyFingerprint = o.keyFingerprint;
        t.ackSigner = o.ackSigner;
        t.byteAllowance = o.byteAllowance;
        t.cpus = o.cpus;
        t.memoryMiB = o.memoryMiB;
        t.diskMiB = o.diskMiB;
        t.gpus = o.gpus;
        t.maxDuration = o.maxDuration;
        t.acceptTimeout = o.acceptTimeout;
        t.datasetId = o.datasetId;
        t.imageDigest = o.imageDigest;
        t.imageRepository = o.imageRepository;
        t.pricePerSecond = o.pricePerSecond;
        t.pricePerGiB = o.pricePerGiB;
        t.collateral = o.collateral;
        order.escrow = o.escrow;
        order.endedBy = o.endedBy;
        order.endedAt = order.state == OrderState.Ended && o.state == OrderState.Active ? _expiresAt(o) : o.endedAt;
        order.settled = o.settled;
        order.rated = o.rated;
        order.claimedSeconds = o.claimedSeconds;
        order.claimedBytes = o.claimedBytes;
        order.ackedBytes = o.ackedBytes;
        order.paid = o.paid;
        order.head = _head(o.head);
        order.ackedHead = _head(o.ackedHead);
    }

    /// The key a claim's proof names the order by (public input 0): the order id bound to this
    /// deployment, `keccak256(abi.encode(chainid, this, orderId)) mod r`. Every tick of the order's
    /// chain is hashed under it, so a proof or a head of one deployment is void on any other.
    function orderKey(uint256 orderId) public view returns (uint256) {
        return uint256(keccak256(abi.encode(block.chainid, address(this), orderId))) % SNARK_SCALAR_FIELD;
    }

    // The order's derived figures (state, expiry, claimable seconds and bytes, a batch's price) are not views
    // of their own: they follow from `getOrder` (and the domain from `eip712Domain()`), and the
    // runtime size limit needs the bytes. shale-contracts computes them from `getOrder`.

    /// The EIP-712 digest the ack signer signs for `ack` (what `eth_signTypedData_v4` signs).
    function acknowledgmentDigest(Acknowledgment calldata ack) public view returns (bytes32) {
        return _hashTypedDataV4(
            keccak256(
                abi.encode(ACKNOWLEDGMENT_TYPEHASH, ack.orderId, ack.head, ack.leaseSeconds, ack.bytesIn, ack.bytesOut)
            )
        );
    }

    // ---------------------------------------------------------------- client side

    /// Creates an order with `provider` on `terms`; the call's value is the escrow.
    /// Returns the new order id (ids start at 1).
    function createOrder(address provider, Terms calldata terms) external payable returns (uint256 orderId) {
        if (msg.value == 0) revert ZeroEscrow();
        if (terms.maxDuration == 0) revert ZeroDuration();
        if (terms.maxDuration > MAX_DURATION_LIMIT) revert DurationTooLong(terms.maxDuration, MAX_DURATION_LIMIT);
        if (terms.acceptTimeout > MAX_DURATION_LIMIT) revert DurationTooLong(terms.acceptTimeout, MAX_DURATION_LIMIT);
        if (terms.acceptTimeout == 0) revert ZeroAcceptTimeout();
        if (terms.keyFingerprint == bytes32(0)) revert ZeroFingerprint();
        if (terms.pricePerSecond > MAX_PRICE) revert PriceTooHigh(terms.pricePerSecond, MAX_PRICE);
        if (terms.pricePerGiB > MAX_PRICE) revert PriceTooHigh(terms.pricePerGiB, MAX_PRICE);
        if (provider == msg.sender) revert SelfOrder(provider);
        // Reverts with the registry's own error for an unknown or withdrawn provider, dataset or image.
        uint64 maxDiskMiB = registry.orderable(provider, terms.datasetId, terms.imageDigest, terms.imageRepository);
        if (terms.diskMiB < MIN_DISK_MIB) revert DiskTooSmall(terms.diskMiB, MIN_DISK_MIB);
        if (terms.diskMiB > maxDiskMiB) revert DiskTooLarge(terms.diskMiB, maxDiskMiB);

        orderId = ++orderCount;
        Record storage o = _orders[orderId];
        o.client = msg.sender;
        o.provider = provider;
        o.ackSigner = terms.ackSigner;
        o.byteAllowance = terms.byteAllowance;
        o.pricePerSecond = uint128(terms.pricePerSecond);
        o.pricePerGiB = uint128(terms.pricePerGiB);
        o.escrow = _u128(msg.value);
        o.maxDuration = uint32(terms.maxDuration);
        o.createdAt = uint64(block.timestamp);
        o.cpus = terms.cpus;
        o.gpus = terms.gpus;
        o.memoryMiB = terms.memoryMiB;
        o.diskMiB = terms.diskMiB;
        o.acceptTimeout = terms.acceptTimeout;
        o.keyFingerprint = terms.keyFingerprint;
        o.collateral = terms.collateral;
        o.datasetId = terms.datasetId;
        o.imageDigest = terms.imageDigest;
        o.imageRepository = terms.imageRepository;
        emit OrderCreated(orderId, msg.sender, provider, msg.value, terms.collateral, terms.datasetId);
    }

    /// Adds escrow to a Pending or live Active order (the meter tops up to keep a session going).
    function topUp(uint256 orderId) external payable {
        Record storage o = _order(orderId);
        if (msg.sender != o.client) revert NotClient(orderId, msg.sender);
        if (msg.value == 0) revert ZeroAmount();
        OrderState s = _stateOf(o);
        if (s != OrderState.Pending && s != OrderState.Active) revert OrderNotActive(orderId, s);
        o.escrow += _u128(msg.value);
        emit OrderToppedUp(orderId, msg.value, o.escrow);
    }

    /// Cancels a Pending order with a full refund of the escrow. The client may cancel once
    /// `createdAt + acceptTimeout` has passed; the provider may decline at any time (`decline`
    /// does the same and says why).
    function cancel(uint256 orderId) public nonReentrant {
        Record storage o = _order(orderId);
        if (msg.sender != o.client && msg.sender != o.provider) revert NotParty(orderId, msg.sender);
        if (o.state != OrderState.Pending) revert OrderNotPending(orderId, _stateOf(o));
        if (msg.sender == o.client) {
            uint64 cancellableAt = o.createdAt + o.acceptTimeout;
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

    /// Rates the provider of an ended order that paid it something, once: 1 to 5 stars and a
    /// short review (<= 280 bytes). The rating weighs what the order paid the provider so far.
    function rate(uint256 orderId, uint8 stars, string calldata review) external {
        Record storage o = _order(orderId);
        if (msg.sender != o.client) revert NotClient(orderId, msg.sender);
        OrderState s = _stateOf(o);
        if (s != OrderState.Ended) revert OrderNotEnded(orderId, s);
        if (o.rated) revert AlreadyRated(orderId);
        if (o.paid == 0) revert NothingPaid(orderId);
        if (stars < 1 || stars > 5) revert InvalidStars(stars);
        if (bytes(review).length > MAX_REVIEW) revert TooLong("review", bytes(review).length, MAX_REVIEW);
        o.rated = true;
        registry.addRating(o.provider, stars, o.paid);
        emit Rated(orderId, o.provider, stars, review);
    }

    // ---------------------------------------------------------------- provider side

    /// Declines a Pending order, as `cancel` by its provider does (the client gets the whole
    /// escrow back, the order reads Cancelled and `OrderCancelled` is emitted), and records why in
    /// `OrderDeclined`: the client learns, from the log alone, whether to retry elsewhere.
    /// `reason` is at most `MAX_DECLINE_REASON` bytes.
    function decline(uint256 orderId, string calldata reason) external {
        if (msg.sender != _order(orderId).provider) revert NotProvider(orderId, msg.sender);
        if (bytes(reason).length > MAX_DECLINE_REASON) {
            revert TooLong("reason", bytes(reason).length, MAX_DECLINE_REASON);
        }
        emit OrderDeclined(orderId, reason);
        cancel(orderId);
    }

    /// Accepts a Pending order before `createdAt + acceptTimeout` (from then on the client may
    /// cancel); the call's value must equal the order's collateral exactly.
    function accept(uint256 orderId) external payable {
        Record storage o = _order(orderId);
        if (msg.sender != o.provider) revert NotProvider(orderId, msg.sender);
        if (o.state != OrderState.Pending) revert OrderNotPending(orderId, o.state);
        uint64 deadline = o.createdAt + o.acceptTimeout;
        if (block.timestamp >= deadline) revert AcceptTimeoutPassed(orderId, deadline);
        if (msg.value != o.collateral) revert WrongCollateral(orderId, o.collateral, msg.value);
        o.state = OrderState.Active;
        o.acceptedAt = uint64(block.timestamp);
        // The provider pays for creating the head slots here rather than in its first claim.
        o.head = MARK;
        if (o.ackSigner != address(0)) o.ackedHead = MARK;
        emit OrderAccepted(orderId, msg.sender, msg.value, _expiresAt(o));
    }

    /// Terminates a live order; either side may. Usage up to now stays claimable for CLAIM_WINDOW.
    function terminate(uint256 orderId) external {
        Record storage o = _order(orderId);
        if (msg.sender != o.client && msg.sender != o.provider) revert NotParty(orderId, msg.sender);
        OrderState s = _stateOf(o);
        if (s != OrderState.Active) revert OrderNotActive(orderId, s);
        o.state = OrderState.Ended;
        o.endedAt = uint64(block.timestamp);
        o.endedBy = msg.sender;
        emit OrderTerminated(orderId, msg.sender, o.endedAt);
    }

    /// Records an acknowledgment signed by the order's ack signer; anyone may submit it. Claims
    /// may then be paid for up to its cumulative byte total. An acknowledgment of another order
    /// or below the recorded total is refused; one of the same total replaces the recorded head.
    function acknowledge(uint256 orderId, Acknowledgment calldata ack, bytes calldata signature) external {
        _acknowledge(orderId, _order(orderId), ack, signature);
    }

    /// Claims metered usage for one proven batch of ticks and pays it to the provider.
    /// `leaseSeconds`, `bytesIn`, `bytesOut` are the batch totals the proof commits to; the proof
    /// links the order's stored head to `nextHead`. See the contract's doc for what a claim may be
    /// paid for; a batch of an ended lease that runs past its end is paid up to the end.
    function claim(
        uint256 orderId,
        uint32 batchCapacity,
        bytes32 nextHead,
        uint64 leaseSeconds,
        uint64 bytesIn,
        uint64 bytesOut,
        bytes calldata proof
    ) external nonReentrant {
        _claim(orderId, _order(orderId), batchCapacity, nextHead, leaseSeconds, bytesIn, bytesOut, proof);
    }

    /// `acknowledge(orderId, ack, ackSignature)` then `claim(...)`, in one transaction: what the
    /// settler sends when its batch needs the client's newest acknowledgment.
    function claimWithAck(
        uint256 orderId,
        uint32 batchCapacity,
        bytes32 nextHead,
        uint64 leaseSeconds,
        uint64 bytesIn,
        uint64 bytesOut,
        bytes calldata proof,
        Acknowledgment calldata ack,
        bytes calldata ackSignature
    ) external nonReentrant {
        Record storage o = _order(orderId);
        _acknowledge(orderId, o, ack, ackSignature);
        _claim(orderId, o, batchCapacity, nextHead, leaseSeconds, bytesIn, bytesOut, proof);
    }

    /// Closes an ended order's books: the rest of the escrow (plus any slash) to the client, the
    /// collateral (less any slash) to the provider. Anyone may settle once the claim window is
    /// over; the provider may settle earlier, which gives up its remaining claims.
    function settle(uint256 orderId) external nonReentrant {
        Record storage o = _order(orderId);
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
        uint256 slash =
            _collateralSlash(o.collateral, o.maxDuration, _expiresAt(o) - o.endedAt, o.endedBy == o.provider);
        uint256 refund = o.escrow;
        uint256 collateralBack = o.collateral - slash;
        o.escrow = 0;
        o.settled = true;
        emit OrderSettled(orderId, refund, collateralBack, slash);
        _pay(o.client, refund + slash);
        _pay(o.provider, collateralBack);
    }

    /// The collateral slashing rule: an early termination by the provider forfeits
    /// `ceil(collateral * unservedSeconds / maxDuration)`; anything else forfeits nothing.
    function _collateralSlash(uint256 collateral, uint64 maxDuration, uint64 unservedSeconds, bool byProvider)
        internal
        pure
        returns (uint256)
    {
        if (!byProvider || unservedSeconds == 0 || collateral == 0) return 0;
        uint256 num = collateral * unservedSeconds;
        return num / maxDuration + (num % maxDuration == 0 ? 0 : 1);
    }

    /// Pulls payments that could not be pushed to the caller. Forwards all the call's gas (a
    /// contract wallet that needs more than the push stipend is paid here) and copies no return
    /// data.
    function withdraw() external nonReentrant {
        uint256 amount = owed[msg.sender];
        if (amount == 0) revert NothingOwed(msg.sender);
        owed[msg.sender] = 0;
        emit Withdrawn(msg.sender, amount);
        bool ok;
        address to = msg.sender;
        assembly ("memory-safe") {
            ok := call(gas(), to, amount, 0, 0, 0, 0)
        }
        if (!ok) revert TransferFailed(msg.sender, amount);
    }

    // ---------------------------------------------------------------- internals

    function _enter() private {
        if (_lock != 1) revert Reentrancy();
        _lock = 2;
    }

    function _order(uint256 orderId) private view returns (Record storage o) {
        o = _orders[orderId];
        if (o.client == address(0)) revert OrderNotFound(orderId);
    }

    /// The head stored in a marked slot (0 before the first claim or acknowledgment).
    function _head(uint256 stored) private pure returns (bytes32) {
        return bytes32(stored & (MARK - 1));
    }

    /// Escrow is kept in 128 bits: refuse (never truncate) a value that would not fit.
    function _u128(uint256 value) private pure returns (uint128) {
        if (value > type(uint128).max) revert AmountTooLarge(value);
        return uint128(value);
    }

    function _expiresAt(Record storage o) private view returns (uint64) {
        return o.acceptedAt + o.maxDuration;
    }

    function _stateOf(Record storage o) private view returns (OrderState) {
        if (o.state == OrderState.Active && block.timestamp >= _expiresAt(o)) return OrderState.Ended;
        return o.state;
    }

    /// Wall-clock seconds of the lease so far: from acceptance to now, or to the end.
    function _leaseSecondsSoFar(Record storage o) private view returns (uint64) {
        uint64 end = uint64(block.timestamp);
        if (o.state == OrderState.Ended) end = o.endedAt;
        uint64 expiry = _expiresAt(o);
        if (end > expiry) end = expiry;
        return end - o.acceptedAt;
    }

    function _bytesAllowed(Record storage o) private view returns (uint256) {
        uint256 acked = o.ackedBytes;
        uint64 allowance = o.byteAllowance;
        return acked > allowance ? acked : allowance;
    }

    function _acknowledge(uint256 orderId, Record storage o, Acknowledgment calldata ack, bytes calldata signature)
        private
    {
        if (ack.orderId != orderId) revert AckForAnotherOrder(orderId, ack.orderId);
        OrderState s = _stateOf(o);
        if (s != OrderState.Active && s != OrderState.Ended) revert OrderNotActive(orderId, s);
        if (o.settled) revert AlreadySettled(orderId);
        address signer = o.ackSigner;
        if (signer == address(0)) revert NoAckSigner(orderId);
        // tryRecover refuses malformed signatures and high-s (malleable) ones.
        (address recovered, ECDSA.RecoverError err,) = ECDSA.tryRecover(acknowledgmentDigest(ack), signature);
        if (err != ECDSA.RecoverError.NoError || recovered != signer) {
            revert InvalidAckSignature(orderId, signer, recovered);
        }
        uint256 total = uint256(ack.bytesIn) + uint256(ack.bytesOut);
        uint256 recorded = o.ackedBytes;
        if (total < recorded) revert AckOlderThanRecorded(orderId, total, recorded);
        o.ackedBytes = uint96(total);
        o.ackedHead = MARK | uint256(ack.head);
        emit Acknowledged(orderId, ack.head, ack.leaseSeconds, ack.bytesIn, ack.bytesOut);
    }

    function _claim(
        uint256 orderId,
        Record storage o,
        uint32 batchCapacity,
        bytes32 nextHead,
        uint64 leaseSeconds,
        uint64 bytesIn,
        uint64 bytesOut,
        bytes calldata proof
    ) private {
        if (msg.sender != o.provider) revert NotProvider(orderId, msg.sender);
        OrderState s = _stateOf(o);
        if (s != OrderState.Active && s != OrderState.Ended) revert OrderNotActive(orderId, s);
        if (o.settled) revert AlreadySettled(orderId);
        if (nextHead == _head(o.head)) revert CommitmentAlreadyPaid(orderId, nextHead);
        if (uint256(nextHead) >= SNARK_SCALAR_FIELD) revert HeadOutOfField(nextHead);
        _verify(orderId, o, batchCapacity, nextHead, leaseSeconds, bytesIn, bytesOut, proof);

        uint64 paidSeconds = _secondsToPay(orderId, o, s, leaseSeconds);
        uint256 claimed = o.claimedBytes;
        uint256 paidBytes = _bytesToPay(orderId, o, claimed, uint256(bytesIn) + bytesOut);
        uint256 amount = uint256(paidSeconds) * o.pricePerSecond + (paidBytes * o.pricePerGiB) / GIB;
        uint256 escrow = o.escrow;
        if (amount > escrow) revert ClaimExceedsEscrow(orderId, amount, escrow);

        // amount <= escrow < 2^128 and claimed seconds stay <= the lease's seconds < 2^32, so
        // neither cast truncates. Claimed bytes count every proved byte, paid or forfeited (so
        // forfeited bytes can never be paid later); they saturate rather than wrap, which only
        // ever lowers what is payable.
        uint256 bytesTotal = claimed + bytesIn + bytesOut;
        o.escrow = uint128(escrow - amount);
        o.paid += uint128(amount);
        o.claimedSeconds += uint32(paidSeconds);
        o.claimedBytes = bytesTotal > type(uint96).max ? type(uint96).max : uint96(bytesTotal);
        o.head = MARK | uint256(nextHead);
        emit Claimed(orderId, nextHead, paidSeconds, bytesIn, bytesOut, amount, escrow - amount);
        _pay(o.provider, amount);
    }

    /// The batch's seconds that may be paid: all of them while they fit the lease's chain time so
    /// far; past it, a live lease refuses the batch (the time has not come yet), an ended lease
    /// pays up to its end.
    function _secondsToPay(uint256 orderId, Record storage o, OrderState s, uint64 leaseSeconds)
        private
        returns (uint64)
    {
        uint64 allowed = _leaseSecondsSoFar(o);
        uint64 claimed = o.claimedSeconds;
        uint256 total = uint256(claimed) + uint256(leaseSeconds);
        if (total <= allowed) return leaseSeconds;
        if (s != OrderState.Ended) {
            revert ClaimExceedsLeaseTime(orderId, total > type(uint64).max ? type(uint64).max : uint64(total), allowed);
        }
        uint64 paidSeconds = allowed - claimed;
        emit ClaimTrimmed(orderId, leaseSeconds, paidSeconds);
        return paidSeconds;
    }

    /// The batch's bytes that may be paid: what still fits max(acknowledged, allowance) above the
    /// bytes already claimed. The rest is forfeited for good (`BytesTrimmed`): ticks are proved
    /// whole, so a batch is never refused for its bytes, or one unacknowledged byte would block
    /// every later second of the lease.
    function _bytesToPay(uint256 orderId, Record storage o, uint256 claimed, uint256 batchBytes)
        private
        returns (uint256)
    {
        uint256 allowed = _bytesAllowed(o);
        uint256 room = allowed > claimed ? allowed - claimed : 0;
        if (batchBytes <= room) return batchBytes;
        emit BytesTrimmed(orderId, batchBytes, room);
        return room;
    }

    function _verify(
        uint256 orderId,
        Record storage o,
        uint32 batchCapacity,
        bytes32 nextHead,
        uint64 leaseSeconds,
        uint64 bytesIn,
        uint64 bytesOut,
        bytes calldata proof
    ) private view {
        ITickVerifier verifier = _verifiers[batchCapacity];
        if (address(verifier) == address(0)) revert UnknownBatchCapacity(batchCapacity);
        uint256[6] memory input = [
            orderKey(orderId),
            uint256(_head(o.head)),
            uint256(nextHead),
            uint256(leaseSeconds),
            uint256(bytesIn),
            uint256(bytesOut)
        ];
        if (!verifier.verifyClaim(input, proof)) revert InvalidProof(orderId);
    }

    /// Pushes ether with a bounded stipend and no return data; a receiver that refuses it (or
    /// burns the stipend, or answers with a huge blob) gets the amount credited to `owed`
    /// instead, so one party can never block the other's payout.
    ///
    /// The call passes gas 0 with a non-zero value, as Solidity's `transfer` does: the EVM gives
    /// the receiver its 2300-gas stipend, and FEVM, which prices gas differently, detects this
    /// pattern and grants its own fixed limit (ref-fvm #1416). Output size 0 and no
    /// `returndatacopy`: whatever the receiver returns is never copied into our memory.
    function _pay(address to, uint256 amount) private {
        if (amount == 0) return;
        bool ok;
        assembly ("memory-safe") {
            ok := call(0, to, amount, 0, 0, 0, 0)
        }
        if (!ok) {
            owed[to] += amount;
            emit PaymentDeferred(to, amount);
        }
    }
}
