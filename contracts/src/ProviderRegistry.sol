// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title Registry of storage providers that rent out compute next to their data.
///
/// A provider is keyed by the address that registered it. Its entry holds what a client needs to
/// order and connect: the gateway endpoint (`host:port`), the gateway's SSH host public key in
/// OpenSSH format (clients write `known_hosts` from it and never trust on first use), the offer,
/// and the datasets it serves. Ratings are written by the marketplace when clients rate orders
/// that paid the provider something, each weighted by what its order paid.
abstract contract ProviderRegistry {
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
    uint256 internal constant MAX_REVIEW = 280;
    uint256 internal constant MAX_DATASETS = 256;
    uint256 internal constant MAX_IMAGES = 64;
    uint256 internal constant MAX_IMAGE_NAME = 128;
    /// The smallest disk an order may have: below it the provider's filesystem (ext4 with its
    /// journal) cannot hold the order's changes to the image. The provisioner's
    /// `MIN_DISK_BYTES` is the same size.
    uint64 public constant MIN_DISK_MIB = 32;

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

    event ProviderRegistered(address indexed provider, string endpoint, string sshHostKey);
    event ProviderUpdated(address indexed provider, string endpoint, string sshHostKey);
    event ProviderWithdrawn(address indexed provider);
    event DatasetAdded(address indexed provider, string datasetId);
    event DatasetRemoved(address indexed provider, string datasetId);
    event ImageAdded(address indexed provider, string name, bytes32 digest);
    event ImageRemoved(address indexed provider, string name);

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

    /// Adds a rating of `stars` from an order that paid the provider `weight` wei (> 0).
    function _addRating(address provider, uint8 stars, uint256 weight) internal {
        Provider storage p = _providers[provider];
        p.ratingCount += 1;
        p.ratingSum += stars;
        p.ratingWeight += weight;
        p.ratingWeightedStars += weight * stars;
    }

    function _provider(address provider) internal view returns (Provider storage p) {
        p = _providers[provider];
        if (p.owner == address(0)) revert ProviderNotFound(provider);
    }

    function _activeProvider(address provider) internal view returns (Provider storage p) {
        p = _provider(provider);
        if (!p.active) revert ProviderInactive(provider);
    }

    /// Index of a dataset in the provider's list; reverts when the provider does not serve it.
    function _requireDataset(address provider, string calldata datasetId) internal view returns (uint256) {
        uint256 index = _datasetIndex[provider][keccak256(bytes(datasetId))];
        if (index == 0) revert UnknownDataset(provider, datasetId);
        return index - 1;
    }

    /// Reverts unless an order may name `digest`: one of the provider's catalog digests, or 0
    /// (the provider's built-in default) when its catalog is empty.
    function _requireImage(address provider, bytes32 digest) internal view {
        if (_imageDigestRefs[provider][digest] == 0 && (digest != bytes32(0) || _images[provider].length != 0)) {
            revert UnknownImageDigest(provider, digest);
        }
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
    }

    function _clearDatasets(address provider) private {
        Dataset[] storage list = _datasets[provider];
        while (list.length > 0) {
            string memory id = list[list.length - 1].id;
            delete _datasetIndex[provider][keccak256(bytes(id))];
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
