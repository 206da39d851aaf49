// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// A client or provider that is a contract and misbehaves when paid: it refuses ether, answers
/// with a "return bomb" (a huge blob that the payer would pay to copy) or burns all the gas it
/// is given. It forwards any call, so it can play either side of an order.
contract Party {
    enum Mode {
        Accept,
        Refuse,
        ReturnBomb,
        BurnGas
    }

    Mode public mode;

    function setMode(Mode m) external {
        mode = m;
    }

    function exec(address target, uint256 value, bytes calldata data) external returns (bytes memory) {
        (bool ok, bytes memory ret) = target.call{value: value}(data);
        if (!ok) {
            assembly {
                revert(add(ret, 32), mload(ret))
            }
        }
        return ret;
    }

    receive() external payable {
        Mode m = mode;
        if (m == Mode.Refuse) revert("no ether please");
        if (m == Mode.ReturnBomb) {
            // 1 MiB of return data: about 2.2M gas of memory for whoever copies it.
            assembly {
                return(0, 1048576)
            }
        }
        if (m == Mode.BurnGas) {
            while (true) {}
        }
    }
}
