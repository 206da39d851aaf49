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
        /// paid.
        uint256 ratingWeight;
        uint256 ratingWeightedStars;
    }

    uint256 public constant MAX_TEXT = 1024;
    uint256 public constant MAX_REVIEW = 280;
    uint256 public constant MAX_DATASETS = 256;
    /// The smallest disk an order may have: below it the provider's filesystem (ext4 with its
    /// journal) cannot hold the order's changes to the image. The provisioner's
    /// `MIN_DISK_BYTES` is the same size.
    uint64 public constant MIN_DISK_MIB = 32;

    mapping(address => Provider) private _providers;
    mapping(address => Dataset[]) private _datasets;
    /// keccak256(dataset id) => index + 1 in `_datasets[provider]` (0 = absent).
    mapping(address => mapping(bytes32 => uint256)) private _datasetIndex;
    address[] private _providerList;

    event ProviderRegistered(address indexed provider, string endpoint, string sshHostKey);
    event ProviderUpdated(address indexed provider, string endpoint, string sshHostKey);
    event ProviderWithdrawn(address indexed provider);
    event DatasetAdded(address indexed provider, string datasetId);
    event DatasetRemoved(address indexed provider, string datasetId);

    error ProviderNotFound(address provider);
    error AlreadyRegistered(address provider);
    error ProviderInactive(address provider);
    error EmptyField(string field);
    error TooLong(string field, uint256 length, uint256 max);
    error TooManyDatasets(uint256 max);
    error DatasetExists(address provider, string datasetId);
    error UnknownDataset(address provider, string datasetId);
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

    /// Every address that ever registered, in registration order (withdrawn ones included:
    /// check `active`).
    function providerAddresses() external view returns (address[] memory) {
        return _providerList;
    }

    function getProvider(address provider) external view returns (Provider memory) {
        return _provider(provider);
    }

    function getDatasets(address provider) external view returns (Dataset[] memory) {
        _provider(provider);
        return _datasets[provider];
    }

    function getDataset(address provider, string calldata datasetId) external view returns (Dataset memory) {
        _provider(provider);
        return _datasets[provider][_requireDataset(provider, datasetId)];
    }

    /// Rating count and the average weighted by what each rated order paid, in hundredths of a
    /// star, floored (e.g. 5 stars over 2 wei and 4 stars over 1 wei: 14 / 3 reads 466); the
    /// average is 0 when nobody rated yet.
    function rating(address provider) external view returns (uint64 count, uint256 averageCentiStars) {
        Provider storage p = _provider(provider);
        count = p.ratingCount;
        averageCentiStars = p.ratingWeight == 0 ? 0 : (p.ratingWeightedStars * 100) / p.ratingWeight;
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
