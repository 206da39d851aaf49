// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// EIP-712 domain for a contract whose name and version are short literals, and ERC-5267's
/// `eip712Domain()`: the same digests and domain fields as OpenZeppelin's `EIP712`, without its
/// long-string fallback (storage copies of the name and version, and the code to read them),
/// which Marketplace's runtime size limit cannot spare.
abstract contract EIP712 {
    bytes32 private constant TYPE_HASH =
        keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)");
    bytes32 private immutable _hashedName;
    bytes32 private immutable _hashedVersion;

    constructor(string memory name, string memory version) {
        _hashedName = keccak256(bytes(name));
        _hashedVersion = keccak256(bytes(version));
    }

    /// The name and version passed to the constructor (what `eip712Domain()` reports).
    function _eip712Strings() internal pure virtual returns (string memory name, string memory version);

    /// Built on every use (a few hundred gas): right after a fork, under the new chain id.
    function _domainSeparatorV4() internal view returns (bytes32) {
        return keccak256(abi.encode(TYPE_HASH, _hashedName, _hashedVersion, block.chainid, address(this)));
    }

    /// `keccak256("\x19\x01" ‖ domainSeparator ‖ structHash)`.
    function _hashTypedDataV4(bytes32 structHash) internal view returns (bytes32 digest) {
        bytes32 separator = _domainSeparatorV4();
        assembly ("memory-safe") {
            let ptr := mload(0x40)
            mstore(ptr, hex"1901")
            mstore(add(ptr, 0x02), separator)
            mstore(add(ptr, 0x22), structHash)
            digest := keccak256(ptr, 0x42)
        }
    }

    /// ERC-5267: fields 0x0f = name, version, chainId, verifyingContract.
    function eip712Domain()
        external
        view
        returns (
            bytes1 fields,
            string memory name,
            string memory version,
            uint256 chainId,
            address verifyingContract,
            bytes32 salt,
            uint256[] memory extensions
        )
    {
        (name, version) = _eip712Strings();
        return (hex"0f", name, version, block.chainid, address(this), bytes32(0), new uint256[](0));
    }
}
