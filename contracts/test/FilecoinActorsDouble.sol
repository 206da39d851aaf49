// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// TEST ONLY: a double of FEVM's `call_actor_id` precompile, for plain-EVM chains (anvil, forge).
///
/// Installed (`anvil_setCode`, `vm.etch`) at the precompile's address,
/// `0xfe00000000000000000000000000000000000005`, it takes the precompile's ABI input, checks what
/// the real one would refuse (a value, a writable call, another codec), and forwards the call to
/// the actor double installed at the actor's masked-id address (`0xff00…` + the 8-byte actor id:
/// f05 is `0xff00000000000000000000000000000000000005`), answering in the precompile's ABI. It is
/// reached by DELEGATECALL, so it keeps no state of its own: the actors hold it.
contract CallActorByIdDouble {
    /// FVM exit codes: `SYS_INVALID_RECEIVER` (no such actor), `USR_ILLEGAL_ARGUMENT`.
    int256 internal constant SYS_INVALID_RECEIVER = 5;
    int256 internal constant USR_ILLEGAL_ARGUMENT = 16;

    fallback(bytes calldata input) external returns (bytes memory) {
        (uint64 method, uint256 value, uint64 flags, uint64 codec, bytes memory params, uint64 actorId) =
            abi.decode(input, (uint64, uint256, uint64, uint64, bytes, uint64));
        if (value != 0 || flags != 1 || codec != 0x51) return abi.encode(USR_ILLEGAL_ARGUMENT, uint64(0), bytes(""));
        address actor = address(uint160(0xff) << 152 | uint160(actorId));
        if (actor.code.length == 0) return abi.encode(SYS_INVALID_RECEIVER, uint64(0), bytes(""));
        (int256 exitCode, bytes memory ret) = FilecoinActorDouble(actor).invoke(method, params);
        return abi.encode(exitCode, ret.length == 0 ? uint64(0) : uint64(0x51), ret);
    }
}

/// TEST ONLY: the storage market actor (f05) and miner actors, as far as `FilecoinDeals` asks
/// them: deals (piece CID, padded size, miner), a miner's controlling addresses, and a canned
/// answer per method to play a hostile or broken actor.
contract FilecoinActorDouble {
    uint64 internal constant GET_DEAL_DATA_COMMITMENT = 1157985802;
    uint64 internal constant GET_DEAL_PROVIDER = 935081690;
    uint64 internal constant IS_CONTROLLING_ADDRESS = 348244887;
    int256 internal constant USR_NOT_FOUND = 17;
    int256 internal constant USR_SERIALIZATION = 21;
    int256 internal constant USR_UNHANDLED_MESSAGE = 22;

    struct Deal {
        bytes pieceCid;
        uint64 paddedSize;
        uint64 miner;
        bool exists;
    }

    mapping(uint64 => Deal) internal _deals;
    /// keccak256 of f410 address bytes => controls this miner.
    mapping(bytes32 => bool) internal _controllers;
    mapping(uint64 => bytes) internal _canned;

    /// `pieceCid` is the binary CIDv1 (no multibase prefix).
    function setDeal(uint64 dealId, bytes calldata pieceCid, uint64 paddedSize, uint64 miner) external {
        _deals[dealId] = Deal(pieceCid, paddedSize, miner, true);
    }

    function setController(address account, bool controls) external {
        _controllers[keccak256(abi.encodePacked(uint8(4), uint8(10), account))] = controls;
    }

    /// Answers `method` with `ret` (raw CBOR) from now on; empty: answer normally again.
    function setCannedAnswer(uint64 method, bytes calldata ret) external {
        _canned[method] = ret;
    }

    function invoke(uint64 method, bytes calldata params) external view returns (int256, bytes memory) {
        if (_canned[method].length != 0) return (0, _canned[method]);
        if (method == GET_DEAL_DATA_COMMITMENT || method == GET_DEAL_PROVIDER) {
            (bool ok, uint64 dealId) = _readUint(params);
            if (!ok) return (USR_SERIALIZATION, "");
            Deal storage d = _deals[dealId];
            if (!d.exists) return (USR_NOT_FOUND, "");
            if (method == GET_DEAL_PROVIDER) return (0, _uint(d.miner));
            bytes memory cid = abi.encodePacked(uint8(0x00), d.pieceCid);
            return (0, abi.encodePacked(hex"82d82a58", uint8(cid.length), cid, _uint(d.paddedSize)));
        }
        if (method == IS_CONTROLLING_ADDRESS) {
            if (params.length < 2 || uint8(params[0]) != 0x40 + params.length - 1) return (USR_SERIALIZATION, "");
            return (0, _controllers[keccak256(params[1:])] ? bytes(hex"f5") : bytes(hex"f4"));
        }
        return (USR_UNHANDLED_MESSAGE, "");
    }

    function _uint(uint64 v) internal pure returns (bytes memory) {
        if (v < 24) return abi.encodePacked(uint8(v));
        if (v <= type(uint8).max) return abi.encodePacked(uint8(0x18), uint8(v));
        if (v <= type(uint16).max) return abi.encodePacked(uint8(0x19), uint16(v));
        if (v <= type(uint32).max) return abi.encodePacked(uint8(0x1a), uint32(v));
        return abi.encodePacked(uint8(0x1b), v);
    }

    function _readUint(bytes calldata b) internal pure returns (bool, uint64) {
        if (b.length == 0 || uint8(b[0]) >> 5 != 0) return (false, 0);
        uint8 info = uint8(b[0]) & 0x1f;
        if (info < 24) return (b.length == 1, info);
        uint256 size = info == 24 ? 1 : info == 25 ? 2 : info == 26 ? 4 : info == 27 ? 8 : 0;
        if (size == 0 || b.length != 1 + size) return (false, 0);
        uint64 v;
        for (uint256 i = 0; i < size; i++) {
            v = (v << 8) | uint64(uint8(b[1 + i]));
        }
        return (true, v);
    }
}
