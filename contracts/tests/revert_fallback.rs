//! A node that answers a failing gas estimate without revert data (as Lotus does for FEVM) still
//! yields the contract's reason: the client asks `eth_call` for it.
//!
//! The test double is a small HTTP proxy in front of a real anvil that strips `error.data` from
//! `eth_estimateGas` answers and forwards everything else untouched.

mod common;

use common::World;
use serde_json::Value;
use shale_contracts::{ChainError, Marketplace};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// Starts the proxy; returns its URL. It runs until the test's runtime ends.
async fn estimate_stripping_proxy(upstream: String) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let http = alloy::transports::http::reqwest::Client::new();
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            let http = http.clone();
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let (read, mut write) = socket.into_split();
                let mut reader = BufReader::new(read);
                // One JSON-RPC request per HTTP/1.1 request, several per connection.
                loop {
                    let mut length = 0usize;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let header = line.trim_end();
                        if header.is_empty() {
                            break;
                        }
                        if let Some((name, value)) = header.split_once(':') {
                            if name.eq_ignore_ascii_case("content-length") {
                                length = value.trim().parse().unwrap();
                            }
                        }
                    }
                    let mut body = vec![0; length];
                    reader.read_exact(&mut body).await.unwrap();
                    let request: Value = serde_json::from_slice(&body).unwrap();
                    let answer = http
                        .post(&upstream)
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await
                        .unwrap()
                        .bytes()
                        .await
                        .unwrap();
                    let mut answer: Value = serde_json::from_slice(&answer).unwrap();
                    if request["method"] == "eth_estimateGas" {
                        if let Some(error) = answer.get_mut("error").and_then(Value::as_object_mut)
                        {
                            error.remove("data");
                        }
                    }
                    let out = answer.to_string();
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                        out.len()
                    );
                    write.write_all(head.as_bytes()).await.unwrap();
                    write.write_all(out.as_bytes()).await.unwrap();
                }
            });
        }
    });
    url
}

#[tokio::test]
async fn reason_comes_from_eth_call_when_the_estimate_has_no_revert_data() {
    let world = World::with_provider().await;
    let id = world.client.create_order(&world.new_order()).await.unwrap();
    let proxy = estimate_stripping_proxy(world.devnet.rpc_url().to_string()).await;
    let client = Marketplace::connect(&proxy, world.address, Some(world.devnet.signer(2)))
        .await
        .unwrap();

    let err = client.terminate(id).await.unwrap_err();
    assert!(matches!(err, ChainError::Reverted { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("the marketplace refused: order {id} is not active (it is pending)")
    );
    // Through the same proxy, a transaction that is fine still goes through.
    client
        .top_up(id, shale_contracts::U256::from(1u8))
        .await
        .unwrap();
}
