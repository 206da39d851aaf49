// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title Read-only calls into Filecoin's built-in market and miner actors from FEVM.
///
/// FEVM reaches native actors through the `call_actor_id` precompile at
/// `0xfe00000000000000000000000000000000000005`, called with DELEGATECALL. Its input is
/// `abi.encode(uint64 method, uint256 value, uint64 flags, uint64 codec, bytes params, uint64 actorId)`
/// and it answers `abi.encode(int256 exitCode, uint64 codec, bytes returnData)`; params and
/// return data are CBOR. Method numbers are FRC-0042 (`blake2b-512("1|" + name)`, the first four
/// bytes that are at least 2^24). Only the CBOR shapes these three methods use are parsed:
/// - `GetDealDataCommitment(deal id) -> [piece CID (tag 42), padded piece size]`
/// - `GetDealProvider(deal id) -> miner actor id`
/// - `IsControllingAddress(address bytes) -> bool`
///
/// On a chain without the precompile (plain EVM: anvil, mainnet) the DELEGATECALL reaches an
/// account without code, succeeds and returns nothing; every function then reverts with
/// `FilecoinUnavailable`, so a deal can never be taken as checked there. Tests install a double
/// at the precompile's address (`test/FilecoinActorsDouble.sol`).
library FilecoinDeals {
    address internal constant CALL_ACTOR_ID = 0xfe00000000000000000000000000000000000005;
    /// The storage market actor, f05.
    uint64 internal constant MARKET_ACTOR_ID = 5;
    uint64 internal constant GET_DEAL_DATA_COMMITMENT = 1157985802;
    uint64 internal constant GET_DEAL_PROVIDER = 935081690;
    uint64 internal constant IS_CONTROLLING_ADDRESS = 348244887;
    /// IPLD codec of params and returns: plain CBOR, as FEVM's precompile expects.
    uint64 internal constant CBOR_CODEC = 0x51;
    uint64 internal constant READ_ONLY = 1;
    /// A larger answer than any of these methods gives is not parsed (bounded gas).
    uint256 internal constant MAX_RETURN = 512;

    /// The chain has no `call_actor_id` precompile (not FEVM).
    error FilecoinUnavailable();
    /// The actor answered with a non-zero exit code (e.g. 17, `USR_NOT_FOUND`, for no such deal).
    error ActorCallFailed(uint64 actorId, uint64 method, int256 exitCode);
    /// The actor's answer is not the CBOR shape its method returns.
    error MalformedActorReturn(uint64 actorId, uint64 method);

    /// The piece CID (binary CIDv1, without the multibase prefix) and padded size of a deal.
    function dealCommitment(uint64 dealId) internal returns (bytes memory pieceCid, uint64 paddedSize) {
        bytes memory ret = _call(MARKET_ACTOR_ID, GET_DEAL_DATA_COMMITMENT, _uint(dealId));
        uint256 pos = _expect(ret, 0, 4, 2, GET_DEAL_DATA_COMMITMENT);
        // The CID: tag 42 around a byte string whose first byte is the identity multibase (0x00).
        (uint8 major, uint64 tag, uint256 next) = _head(ret, pos, GET_DEAL_DATA_COMMITMENT);
        if (major != 6 || tag != 42) revert MalformedActorReturn(MARKET_ACTOR_ID, GET_DEAL_DATA_COMMITMENT);
        uint64 length;
        (major, length, next) = _head(ret, next, GET_DEAL_DATA_COMMITMENT);
        if (major != 2 || length < 2 || next + length > ret.length || ret[next] != 0x00) {
            revert MalformedActorReturn(MARKET_ACTOR_ID, GET_DEAL_DATA_COMMITMENT);
        }
        pieceCid = new bytes(length - 1);
        for (uint256 i = 0; i < length - 1; i++) {
            pieceCid[i] = ret[next + 1 + i];
        }
        (major, paddedSize, next) = _head(ret, next + length, GET_DEAL_DATA_COMMITMENT);
        if (major != 0) revert MalformedActorReturn(MARKET_ACTOR_ID, GET_DEAL_DATA_COMMITMENT);
    }

    /// The actor id of the miner that a deal is stored with.
    function dealProvider(uint64 dealId) internal returns (uint64 minerId) {
        bytes memory ret = _call(MARKET_ACTOR_ID, GET_DEAL_PROVIDER, _uint(dealId));
        (uint8 major, uint64 value, uint256 next) = _head(ret, 0, GET_DEAL_PROVIDER);
        // A bare integer; a one-field tuple is read too, should an actor version wrap it.
        if (major == 4 && value == 1) (major, value,) = _head(ret, next, GET_DEAL_PROVIDER);
        if (major != 0) revert MalformedActorReturn(MARKET_ACTOR_ID, GET_DEAL_PROVIDER);
        return value;
    }

    /// Whether `account`'s f410 address is the owner, worker or a control address of the miner.
    function isControllingAddress(uint64 minerId, address account) internal returns (bool) {
        // f410 address bytes: protocol 4, namespace 10 (the EAM) as LEB128, the 20 address bytes.
        bytes memory f4 = abi.encodePacked(uint8(4), uint8(10), account);
        bytes memory ret = _call(minerId, IS_CONTROLLING_ADDRESS, abi.encodePacked(uint8(0x40 + 22), f4));
        if (ret.length != 1 || (ret[0] != 0xf5 && ret[0] != 0xf4)) {
            revert MalformedActorReturn(minerId, IS_CONTROLLING_ADDRESS);
        }
        return ret[0] == 0xf5;
    }

    function _call(uint64 actorId, uint64 method, bytes memory params) private returns (bytes memory) {
        (bool ok, bytes memory data) =
            CALL_ACTOR_ID.delegatecall(abi.encode(method, uint256(0), READ_ONLY, CBOR_CODEC, params, actorId));
        // Three words of head pos least: anything shorter is the empty answer of a chain without it.
        if (!ok || data.length < 96) revert FilecoinUnavailable();
        (int256 exitCode,, bytes memory ret) = abi.decode(data, (int256, uint64, bytes));
        if (exitCode != 0) revert ActorCallFailed(actorId, method, exitCode);
        if (ret.length == 0 || ret.length > MAX_RETURN) revert MalformedActorReturn(actorId, method);
        return ret;
    }

    /// CBOR of an unsigned integer (major type 0), in its shortest form.
    function _uint(uint64 v) private pure returns (bytes memory) {
        if (v < 24) return abi.encodePacked(uint8(v));
        if (v <= type(uint8).max) return abi.encodePacked(uint8(0x18), uint8(v));
        if (v <= type(uint16).max) return abi.encodePacked(uint8(0x19), uint16(v));
        if (v <= type(uint32).max) return abi.encodePacked(uint8(0x1a), uint32(v));
        return abi.encodePacked(uint8(0x1b), v);
    }

    /// Reads a head of major type `major` with argument `value` at `pos`; returns what follows.
    function _expect(bytes memory b, uint256 pos, uint8 major, uint64 value, uint64 method)
        private
        pure
        returns (uint256)
    {
        (uint8 m, uint64 v, uint256 next) = _head(b, pos, method);
        if (m != major || v != value) revert MalformedActorReturn(MARKET_ACTOR_ID, method);
        return next;
    }

    /// One CBOR head: its major type, its argument (0–2^64-1) and the offset after it.
    function _head(bytes memory b, uint256 pos, uint64 method)
        private
        pure
        returns (uint8 major, uint64 value, uint256 next)
    {
        if (pos >= b.length) revert MalformedActorReturn(MARKET_ACTOR_ID, method);
        uint8 initial = uint8(b[pos]);
        major = initial >> 5;
        uint8 info = initial & 0x1f;
        next = pos + 1;
        if (info < 24) return (major, info, next);
        uint256 size;
        if (info == 24) size = 1;
        else if (info == 25) size = 2;
        else if (info == 26) size = 4;
        else if (info == 27) size = 8;
        else revert MalformedActorReturn(MARKET_ACTOR_ID, method);
        if (next + size > b.length) revert MalformedActorReturn(MARKET_ACTOR_ID, method);
        for (uint256 i = 0; i < size; i++) {
            value = (value << 8) | uint64(uint8(b[next + i]));
        }
        next += size;
    }
}
