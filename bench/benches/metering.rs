//! Metering overhead on the byte path: the gateway's pumps copy 64 KiB reads from the process to
//! the SSH channel, with one end wrapped in `Metered` (two relaxed atomic adds per read). This
//! compares the same copy with and without the wrapper, in one run, over an in-memory pipe (the
//! fastest sink there is, so the overhead shows at its largest).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use shale_meter::{Metered, SessionCounter, Side};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOTAL: usize = 64 << 20;
const CHUNK: usize = 64 << 10;

async fn pump(metered: bool) {
    let (mut to_pump, from_producer) = tokio::io::duplex(CHUNK * 4);
    let (to_sink, mut sink) = tokio::io::duplex(CHUNK * 4);
    let producer = tokio::spawn(async move {
        let chunk = vec![1u8; CHUNK];
        for _ in 0..TOTAL / CHUNK {
            to_pump.write_all(&chunk).await.unwrap();
        }
    });
    let consumer = tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        let mut n = 0;
        while n < TOTAL {
            n += sink.read(&mut buf).await.unwrap();
        }
    });
    let mut from = from_producer;
    let mut buf = vec![0u8; CHUNK];
    let session = SessionCounter::default();
    if metered {
        let mut to = Metered::new(to_sink, session.open_channel(), Side::Client);
        loop {
            let n = from.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            to.write_all(&buf[..n]).await.unwrap();
        }
        assert_eq!(session.bytes().bytes_out as usize, TOTAL);
    } else {
        let mut to = to_sink;
        loop {
            let n = from.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            to.write_all(&buf[..n]).await.unwrap();
        }
    }
    producer.await.unwrap();
    consumer.await.unwrap();
}

fn metering(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut group = c.benchmark_group("pump_64MiB");
    group.throughput(Throughput::Bytes(TOTAL as u64));
    group.sample_size(20);
    for metered in [false, true] {
        let name = if metered { "metered" } else { "bare" };
        group.bench_with_input(BenchmarkId::from_parameter(name), &metered, |b, &m| {
            b.to_async(&rt).iter(|| pump(m));
        });
    }
    group.finish();
}

criterion_group!(benches, metering);
criterion_main!(benches);
