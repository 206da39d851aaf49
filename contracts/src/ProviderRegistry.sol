// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {FilecoinDeals} from "./FilecoinDeals.sol";

/// @title Registry of storage providers that rent out compute next to their data.
///
/// A provider is keyed by the address that registered it. Its entry holds what a client needs to
/// order and connect: the gateway endpoint (`host:port`), the gateway's SSH host public key in
/// OpenSSH format (clients write `known_hosts` from it and never trust on first use), the offer,
/// the datasets it serves and its image catalog. Ratings are written by the marketplace when
/// clients rate orders that paid the provider something, each weighted by what its order paid.
///
/// Its own contract, deployed by the `Marketplace` it serves (`marketplace`), so that neither
/// outgrows EIP-170's runtime size limit.
///
/// Datasets and Filecoin deals: a dataset that names a deal id is checked against the chain's
/// storage market when it is added (FEVM only, see `FilecoinDeals`): the deal's piece CID must be
/// the dataset's (or fills it in when the dataset names none) and the deal must be stored with the
/// miner the provider set with `setMiner`, which checks that the provider's address controls that
/// miner. A dataset without a deal id is the provider's word alone. `markVerified` records when the
/// provider last checked that the bytes it serves hash to the piece CID.
contract ProviderRegistry {
    /// Resources and tariff a provider offers. Prices are integer wei.
    struct Offer {
        // cpus, memoryMiB, diskMiB and maxDiskMiB share one storage slot (4 + 8 + 8 + 8 bytes).
        uint32 cpus;
        uint64 memoryMiB;
        /// Disk an order gets when it does not ask for a size: everything the order can write
        /// (its root filesystem's changes, /work) is bounded by its disk. Never 0.
        uint64 diskMiB;
        /// The most disk one order may ask for; at least `diskMiB`.
        uint64 maxDiskMiB;
        string gpuModel;
        uint32 gpuCount;
        uint256 pricePerSecond;
        uint256 pricePerGiB;
    }

    /// A dataset the provider stores and can mount read-only into a lease.
    struct Dataset {
        /// Provider-chosen id, unique per provider; orders name it.
        string id;
        /// Filecoin piece CID (may be empty when only a deal id is known).
        string pieceCid;
        /// Filecoin storage deal id (0 when unknown).
        uint64 dealId;
        uint64 sizeBytes;
        string description;
    }

    /// An OCI image the provider runs orders from, pinned by the digest of its manifest or index.
    struct Image {
        /// Provider-chosen name, unique per provider (e.g. `default`, `pytorch-cuda`); clients
        /// pick an image by it and the order carries its digest.
        string name;
        /// SHA-256 of the image's OCI manifest or index: the hex of `sha256:<hex>` as 32 bytes.
        bytes32 digest;
        string description;
        /// Built for the provider's GPUs (CUDA user space and the like).
        bool gpuReady;
        /// Approximate size on disk (0 when unknown).
        uint64 sizeBytes;
    }

    struct Provider {
        address owner;
        /// Gateway endpoint, `host:port`.
        string endpoint;
        /// SSH host public key, OpenSSH format (`ssh-ed25519 AAAA...`).
        string sshHostKey;
        Offer offer;
        /// False once withdrawn: no new orders; live orders keep running.
        bool active;
        uint64 registeredAt;
        /// Number of ratings and the plain sum of their stars.
        uint64 ratingCount;
        uint64 ratingSum;
        /// Wei the rated orders paid the provider (when rated), and the sum of stars times that
        /// wei: `rating()`'s average is their quotient, so a rating counts as much as its order
        /// paid. The average in hundredths of a star is `ratingWeightedStars * 100 / ratingWeight`,
        /// floored (0 with no ratings); there is no view of its own (runtime size).
        uint256 ratingWeight;
        uint256 ratingWeightedStars;
    }

    uint256 internal constant MAX_TEXT = 1024;
    uint256 internal constant MAX_DATASETS = 256;
    uint256 internal constant MAX_IMAGES = 64;
    uint256 internal constant MAX_IMAGE_NAME = 128;
    /// Registries a provider may let clients bring images from, and the longest host name.
    uint256 internal constant MAX_CLIENT_REGISTRIES = 16;
    uint256 internal constant MAX_HOST = 253;
    /// The smallest disk an order may have: below it the provider's filesystem (ext4 with its
    /// journal) cannot hold the order's changes to the image. The provisioner's
    /// `MIN_DISK_BYTES` is the same size.
    uint64 public constant MIN_DISK_MIB = 32;

    /// The marketplace that deployed this registry: the only writer of ratings.
    address public immutable marketplace;

    mapping(address => Provider) private _providers;
    mapping(address => Dataset[]) private _datasets;
    /// keccak256(dataset id) => index + 1 in `_datasets[provider]` (0 = absent).
    mapping(address => mapping(bytes32 => uint256)) private _datasetIndex;
    address[] private _providerList;
    mapping(address => Image[]) private _images;
    /// keccak256(image name) => index + 1 in `_images[provider]` (0 = absent).
    mapping(address => mapping(bytes32 => uint256)) private _imageIndex;
    /// digest => how many of the provider's image names pin it (0 = not in the catalog).
    mapping(address => mapping(bytes32 => uint256)) private _imageDigestRefs;
    /// The Filecoin miner actor id a provider's deals must be stored with (0 = none set).
    mapping(address => uint64) public minerOf;
    /// keccak256(dataset id) => when the provider last verified the dataset's bytes (0 = never).
    mapping(address => mapping(bytes32 => uint64)) private _verifiedAt;
    /// Registry hosts (`host[:port]`) clients may bring their own images from; empty: none.
    mapping(address => string[]) private _clientImageRegistries;

    event ProviderRegistered(address indexed provider, string endpoint, string sshHostKey);
    event ProviderUpdated(address indexed provider, string endpoint, string sshHostKey);
    event ProviderWithdrawn(address indexed provider);
    event DatasetAdded(address indexed provider, string datasetId);
    event DatasetRemoved(address indexed provider, string datasetId);
    event ImageAdded(address indexed provider, string name, bytes32 digest);
    event ImageRemoved(address indexed provider, string name);
    event MinerSet(address indexed provider, uint64 minerId);
    /// A dataset's deal was found in the storage market with the dataset's piece, stored with
    /// the provider's miner.
    event DealChecked(address indexed provider, string datasetId, uint64 dealId, uint64 minerId, uint64 paddedSize);
    event DatasetVerified(address indexed provider, string datasetId, uint64 verifiedAt);
    event ClientImageRegistriesSet(address indexed provider, string[] hosts);

    error ProviderNotFound(address provider);
    error AlreadyRegistered(address provider);
    error ProviderInactive(address provider);
    error EmptyField(string field);
    error TooLong(string field, uint256 length, uint256 max);
    error TooManyDatasets(uint256 max);
    error DatasetExists(address provider, string datasetId);
    error UnknownDataset(address provider, string datasetId);
    error TooManyImages(uint256 max);
    /// A name is pinned to one digest: remove the image before adding it again with another.
    error ImageExists(address provider, string name);
    error UnknownImage(address provider, string name);
    /// The order names an image digest the provider's catalog does not list (or 0 while the
    /// provider lists images: an order must then name one of them).
    error UnknownImageDigest(address provider, bytes32 digest);
    /// An offer's default disk must be non-zero and at most its maximum per order.
    error InvalidOfferDisk(uint64 diskMiB, uint64 maxDiskMiB);
    error NotMarketplace(address caller);
    /// The provider's address is not the owner, worker or a control address of the miner.
    error NotMinerController(address provider, uint64 minerId);
    /// A dataset names a deal, but the provider has set no miner (`setMiner`).
    error NoMiner(address provider);
    /// The deal's piece CID is not the dataset's.
    error DealPieceMismatch(uint64 dealId, string datasetPieceCid, string dealPieceCid);
    /// The deal is stored with another miner than the provider's.
    error DealProviderMismatch(uint64 dealId, uint64 providerMiner, uint64 dealMiner);
    /// The provider lets no client bring its own image.
    error ClientImagesNotAllowed(address provider);
    /// The repository is on none of the registries the provider lets clients bring images from.
    error RegistryNotAllowed(address provider, string imageRepository);
    /// A repository (`HOST/PATH`) or host name with a character that has no place in one
    /// (a space, a control character, an at sign), or without its parts.
    error InvalidImageRepository(string value);
    error TooManyClientRegistries(uint256 max);

    modifier onlyMarketplace() {
        if (msg.sender != marketplace) revert NotMarketplace(msg.sender);
        _;
    }

    constructor() {
        marketplace = msg.sender;
    }

    /// Registers the caller as a provider, or re-activates a withdrawn one with fresh details
    /// (its datasets are replaced, its ratings kept).
    function registerProvider(
        string calldata endpoint,
        string calldata sshHostKey,
        Offer calldata offer,
        Dataset[] calldata datasets
    ) external {
        Provider storage p = _providers[msg.sender];
        if (p.active) revert AlreadyRegistered(msg.sender);
        _checkDetails(endpoint, sshHostKey, offer);
        if (p.owner == address(0)) {
            p.owner = msg.sender;
            _providerList.push(msg.sender);
        } else {
            _clearDatasets(msg.sender);
        }
        p.endpoint = endpoint;
        p.sshHostKey = sshHostKey;
        p.offer = offer;
        p.active = true;
        p.registeredAt = uint64(block.timestamp);
        emit ProviderRegistered(msg.sender, endpoint, sshHostKey);
        for (uint256 i = 0; i < datasets.length; i++) {
            _addDataset(msg.sender, datasets[i]);
        }
    }

    /// Replaces the caller's endpoint, host key and offer. Live orders keep their own tariff.
    function updateProvider(string calldata endpoint, string calldata sshHostKey, Offer calldata offer) external {
        Provider storage p = _activeProvider(msg.sender);
        _checkDetails(endpoint, sshHostKey, offer);
        p.endpoint = endpoint;
        p.sshHostKey = sshHostKey;
        p.offer = offer;
        emit ProviderUpdated(msg.sender, endpoint, sshHostKey);
    }

    /// Withdraws the caller's offer: no new orders can name it. Live orders are unaffected.
    function withdrawProvider() external {
        Provider storage p = _activeProvider(msg.sender);
        p.active = false;
        emit ProviderWithdrawn(msg.sender);
    }

    /// Sets the Filecoin miner (actor id, e.g. 1234 for f01234) whose deals the caller's
    /// datasets may name. FEVM only: the miner actor must list the caller's f410 address as its
    /// owner, worker or a control address (`lotus-miner actor control set`). Datasets already
    /// listed keep the check they passed.
    function setMiner(uint64 minerId) external {
        _activeProvider(msg.sender);
        if (!FilecoinDeals.isControllingAddress(minerId, msg.sender)) revert NotMinerController(msg.sender, minerId);
        minerOf[msg.sender] = minerId;
        emit MinerSet(msg.sender, minerId);
    }

    /// Lets clients bring their own images, pulled by digest from `hosts` (registry host names,
    /// `host[:port]`, as an image reference starts with them); an empty list allows none. Replaces
    /// the caller's list. Orders already placed keep their image.
    function setClientImageRegistries(string[] calldata hosts) external {
        _activeProvider(msg.sender);
        if (hosts.length > MAX_CLIENT_REGISTRIES) revert TooManyClientRegistries(MAX_CLIENT_REGISTRIES);
        for (uint256 i = 0; i < hosts.length; i++) {
            bytes calldata h = bytes(hosts[i]);
            if (h.length == 0 || h.length > MAX_HOST || !_plain(h, false)) revert InvalidImageRepository(hosts[i]);
        }
        string[] storage list = _clientImageRegistries[msg.sender];
        while (list.length > 0) {
            list.pop();
        }
        for (uint256 i = 0; i < hosts.length; i++) {
            list.push(hosts[i]);
        }
        emit ClientImageRegistriesSet(msg.sender, hosts);
    }

    /// The registry hosts `provider` lets clients bring images from (empty: none).
    function clientImageRegistries(address provider) external view returns (string[] memory) {
        return _clientImageRegistries[provider];
    }

    /// Records that the caller verified, now, that the bytes it serves for each of `datasetIds`
    /// hash to the dataset's piece CID (the gateway's provisioner does, on its schedule).
    function markVerified(string[] calldata datasetIds) external {
        _activeProvider(msg.sender);
        for (uint256 i = 0; i < datasetIds.length; i++) {
            bytes32 key = keccak256(bytes(datasetIds[i]));
            if (_datasetIndex[msg.sender][key] == 0) revert UnknownDataset(msg.sender, datasetIds[i]);
            _verifiedAt[msg.sender][key] = uint64(block.timestamp);
            emit DatasetVerified(msg.sender, datasetIds[i], uint64(block.timestamp));
        }
    }

    function addDataset(Dataset calldata dataset) external {
        _activeProvider(msg.sender);
        _addDataset(msg.sender, dataset);
    }

    function removeDataset(string calldata datasetId) external {
        _activeProvider(msg.sender);
        bytes32 key = keccak256(bytes(datasetId));
        uint256 index = _datasetIndex[msg.sender][key];
        if (index == 0) revert UnknownDataset(msg.sender, datasetId);
        Dataset[] storage list = _datasets[msg.sender];
        uint256 last = list.length;
        if (index != last) {
            list[index - 1] = list[last - 1];
            _datasetIndex[msg.sender][keccak256(bytes(list[index - 1].id))] = index;
        }
        list.pop();
        delete _datasetIndex[msg.sender][key];
        delete _verifiedAt[msg.sender][key];
        emit DatasetRemoved(msg.sender, datasetId);
    }

    /// Adds an image to the caller's catalog. Names are unique: re-adding a name is refused
    /// (`ImageExists`), remove it first to pin it to another digest. The catalog is kept when the
    /// provider withdraws and registers again.
    function addImage(Image calldata image) external {
        _activeProvider(msg.sender);
        bytes calldata name = bytes(image.name);
        if (name.length == 0) revert EmptyField("image.name");
        if (name.length > MAX_IMAGE_NAME) revert TooLong("image.name", name.length, MAX_IMAGE_NAME);
        if (image.digest == bytes32(0)) revert EmptyField("image.digest");
        _checkLength("image.description", image.description);
        bytes32 key = keccak256(name);
        if (_imageIndex[msg.sender][key] != 0) revert ImageExists(msg.sender, image.name);
        Image[] storage list = _images[msg.sender];
        if (list.length >= MAX_IMAGES) revert TooManyImages(MAX_IMAGES);
        Image storage img = list.push();
        img.name = image.name;
        img.digest = image.digest;
        img.description = image.description;
        img.gpuReady = image.gpuReady;
        img.sizeBytes = image.sizeBytes;
        _imageIndex[msg.sender][key] = list.length;
        _imageDigestRefs[msg.sender][image.digest] += 1;
        emit ImageAdded(msg.sender, image.name, image.digest);
    }

    /// Removes an image from the caller's catalog; orders that already name its digest keep it.
    function removeImage(string calldata name) external {
        bytes32 key = keccak256(bytes(name));
        uint256 index = _imageIndex[msg.sender][key];
        if (index == 0) revert UnknownImage(msg.sender, name);
        Image[] storage list = _images[msg.sender];
        _imageDigestRefs[msg.sender][list[index - 1].digest] -= 1;
        uint256 last = list.length;
        if (index != last) {
            Image storage to = list[index - 1];
            Image storage from = list[last - 1];
            to.name = from.name;
            to.digest = from.digest;
            to.description = from.description;
            to.gpuReady = from.gpuReady;
            to.sizeBytes = from.sizeBytes;
            _imageIndex[msg.sender][keccak256(bytes(to.name))] = index;
        }
        list.pop();
        delete _imageIndex[msg.sender][key];
        emit ImageRemoved(msg.sender, name);
    }

    /// Every address that ever registered, in registration order (withdrawn ones included:
    /// check `active`).
    function providerAddresses() external view returns (address[] memory) {
        return _providerList;
    }

    /// A provider's entry, its datasets and its image catalog (in no particular order: a removal
    /// moves the last entry into the gap).
    function getProvider(address provider)
        external
        view
        returns (Provider memory, Dataset[] memory datasets, Image[] memory images)
    {
        return (_provider(provider), _datasets[provider], _images[provider]);
    }

    /// When the provider last verified each of its datasets (0 = never), in `getProvider`'s
    /// dataset order.
    function verifiedAt(address provider) external view returns (uint64[] memory times) {
        Dataset[] storage list = _datasets[provider];
        times = new uint64[](list.length);
        for (uint256 i = 0; i < list.length; i++) {
            times[i] = _verifiedAt[provider][keccak256(bytes(list[i].id))];
        }
    }

    /// Reverts unless a client may order from `provider` now with `datasetId` (empty: none) and
    /// the image of `imageDigest`: a catalog image when `imageRepository` is empty, else the
    /// client's own, pulled from `imageRepository` on a registry the provider allows. Returns the
    /// most disk the provider's offer allows per order.
    function orderable(
        address provider,
        string calldata datasetId,
        bytes32 imageDigest,
        string calldata imageRepository
    ) external view returns (uint64 maxDiskMiB) {
        Provider storage p = _activeProvider(provider);
        if (bytes(datasetId).length != 0) _requireDataset(provider, datasetId);
        if (bytes(imageRepository).length == 0) {
            _requireImage(provider, imageDigest);
        } else {
            _requireClientImage(provider, imageDigest, imageRepository);
        }
        return p.offer.maxDiskMiB;
    }

    /// Adds a rating of `stars` from an order that paid the provider `weight` wei (> 0).
    function addRating(address provider, uint8 stars, uint256 weight) external onlyMarketplace {
        Provider storage p = _providers[provider];
        p.ratingCount += 1;
        p.ratingSum += stars;
        p.ratingWeight += weight;
        p.ratingWeightedStars += weight * stars;
    }

    function _provider(address provider) private view returns (Provider storage p) {
        p = _providers[provider];
        if (p.owner == address(0)) revert ProviderNotFound(provider);
    }

    function _activeProvider(address provider) private view returns (Provider storage p) {
        p = _provider(provider);
        if (!p.active) revert ProviderInactive(provider);
    }

    /// Index of a dataset in the provider's list; reverts when the provider does not serve it.
    function _requireDataset(address provider, string calldata datasetId) private view returns (uint256) {
        uint256 index = _datasetIndex[provider][keccak256(bytes(datasetId))];
        if (index == 0) revert UnknownDataset(provider, datasetId);
        return index - 1;
    }

    /// Reverts unless an order may name `digest`: one of the provider's catalog digests, or 0
    /// (the provider's built-in default) when its catalog is empty.
    function _requireImage(address provider, bytes32 digest) private view {
        if (_imageDigestRefs[provider][digest] == 0 && (digest != bytes32(0) || _images[provider].length != 0)) {
            revert UnknownImageDigest(provider, digest);
        }
    }

    /// Reverts unless `repository` is `HOST/PATH` with HOST one of the provider's client image
    /// registries, and the image is named by a digest.
    function _requireClientImage(address provider, bytes32 digest, string calldata repository) private view {
        string[] storage hosts = _clientImageRegistries[provider];
        if (hosts.length == 0) revert ClientImagesNotAllowed(provider);
        if (digest == bytes32(0)) revert EmptyField("imageDigest");
        bytes calldata repo = bytes(repository);
        if (repo.length > MAX_TEXT || !_plain(repo, true)) revert InvalidImageRepository(repository);
        for (uint256 i = 0; i < hosts.length; i++) {
            bytes storage host = bytes(hosts[i]);
            uint256 n = host.length;
            // HOST, a slash, and at least one character of path.
            if (repo.length <= n + 1 || repo[n] != "/") continue;
            bool same = true;
            for (uint256 j = 0; j < n && same; j++) {
                same = repo[j] == host[j];
            }
            if (same) return;
        }
        revert RegistryNotAllowed(provider, repository);
    }

    /// Printable ASCII without space and the at sign; slashes only where `slashes` allows them.
    function _plain(bytes calldata value, bool slashes) private pure returns (bool) {
        for (uint256 i = 0; i < value.length; i++) {
            bytes1 c = value[i];
            if (c <= 0x20 || c >= 0x7f || c == "@" || (!slashes && c == "/")) return false;
        }
        return true;
    }

    function _addDataset(address provider, Dataset calldata dataset) private {
        if (bytes(dataset.id).length == 0) revert EmptyField("dataset.id");
        _checkLength("dataset.id", dataset.id);
        _checkLength("dataset.pieceCid", dataset.pieceCid);
        _checkLength("dataset.description", dataset.description);
        bytes32 key = keccak256(bytes(dataset.id));
        if (_datasetIndex[provider][key] != 0) revert DatasetExists(provider, dataset.id);
        Dataset[] storage list = _datasets[provider];
        if (list.length >= MAX_DATASETS) revert TooManyDatasets(MAX_DATASETS);
        list.push(dataset);
        _datasetIndex[provider][key] = list.length;
        emit DatasetAdded(provider, dataset.id);
        if (dataset.dealId != 0) _checkDeal(provider, list[list.length - 1]);
    }

    /// Checks a dataset's deal in the storage market (see the contract's doc); a dataset without
    /// a piece CID takes the deal's.
    function _checkDeal(address provider, Dataset storage dataset) private {
        uint64 miner = minerOf[provider];
        if (miner == 0) revert NoMiner(provider);
        uint64 dealMiner = FilecoinDeals.dealProvider(dataset.dealId);
        if (dealMiner != miner) revert DealProviderMismatch(dataset.dealId, miner, dealMiner);
        (bytes memory cid, uint64 paddedSize) = FilecoinDeals.dealCommitment(dataset.dealId);
        string memory dealPiece = _base32Cid(cid);
        if (bytes(dataset.pieceCid).length == 0) {
            dataset.pieceCid = dealPiece;
        } else if (keccak256(bytes(dataset.pieceCid)) != keccak256(bytes(dealPiece))) {
            revert DealPieceMismatch(dataset.dealId, dataset.pieceCid, dealPiece);
        }
        emit DealChecked(provider, dataset.id, dataset.dealId, miner, paddedSize);
    }

    /// A binary CID in its canonical text form: multibase `b`, RFC 4648 base32, lower case, no
    /// padding (`baga6ea4seaq…` for a piece CID).
    function _base32Cid(bytes memory cid) private pure returns (string memory) {
        bytes memory alphabet = "abcdefghijklmnopqrstuvwxyz234567";
        bytes memory out = new bytes(1 + (cid.length * 8 + 4) / 5);
        out[0] = "b";
        uint256 buffer;
        uint256 bits;
        uint256 j = 1;
        for (uint256 i = 0; i < cid.length; i++) {
            buffer = (buffer << 8) | uint8(cid[i]);
            bits += 8;
            while (bits >= 5) {
                bits -= 5;
                out[j++] = alphabet[(buffer >> bits) & 31];
            }
        }
        if (bits > 0) out[j++] = alphabet[(buffer << (5 - bits)) & 31];
        return string(out);
    }

    function _clearDatasets(address provider) private {
        Dataset[] storage list = _datasets[provider];
        while (list.length > 0) {
            string memory id = list[list.length - 1].id;
            delete _datasetIndex[provider][keccak256(bytes(id))];
            delete _verifiedAt[provider][keccak256(bytes(id))];
            list.pop();
            emit DatasetRemoved(provider, id);
        }
    }

    function _checkDetails(string calldata endpoint, string calldata sshHostKey, Offer calldata offer) private pure {
        if (bytes(endpoint).length == 0) revert EmptyField("endpoint");
        if (bytes(sshHostKey).length == 0) revert EmptyField("sshHostKey");
        _checkLength("endpoint", endpoint);
        _checkLength("sshHostKey", sshHostKey);
        _checkLength("offer.gpuModel", offer.gpuModel);
        if (offer.diskMiB < MIN_DISK_MIB || offer.diskMiB > offer.maxDiskMiB) {
            revert InvalidOfferDisk(offer.diskMiB, offer.maxDiskMiB);
        }
    }

    function _checkLength(string memory field, string calldata value) private pure {
        if (bytes(value).length > MAX_TEXT) revert TooLong(field, bytes(value).length, MAX_TEXT);
    }
}
