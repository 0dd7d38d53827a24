//! Per-stage throughput of the backup data path, each next to its raw primitive.
//!
//! Run: `cargo bench -p hoard-core --bench stages -- --warm-up-time 1 --measurement-time 3`
//! (see bench/README.md). Every benchmark is single-threaded, so MiB/s is per core.
//!
//! Data: deterministic 1 MiB chunks of log-like text (compresses ~3x with zstd-1) and of random
//! bytes (incompressible), and a 64 MiB mix of both for the chunker.

use std::hint::black_box;
use std::time::Duration;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use hoard_core::chunker::{Chunker, ChunkerParams};
use hoard_core::crypto::{Keys, SEAL_OVERHEAD, SealType, SecretKey};
use hoard_core::id::Id;
use hoard_core::pack::{BlobType, Compression, PackBuilder, SealedBlob};

const MIB: usize = 1024 * 1024;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut r = Rng(seed | 1);
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        v.extend_from_slice(&r.next().to_le_bytes());
    }
    v.truncate(n);
    v
}

fn text_bytes(n: usize, seed: u64) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "INFO",
        "WARN",
        "request",
        "response",
        "user",
        "volume",
        "snapshot",
        "backup",
        "pod",
        "node",
        "took",
        "error",
        "index",
        "table",
        "status=active",
        "status=failed",
        "retry",
        "timeout",
        "namespace",
    ];
    let mut r = Rng(seed | 1);
    let mut v = Vec::with_capacity(n + 256);
    let mut t = 1_700_000_000u64;
    while v.len() < n {
        t += r.next() % 3;
        let line = format!(
            "{t}.{:03} {} [{}] req={:016x} user={} {} {} took={}ms\n",
            r.next() % 1000,
            WORDS[(r.next() % 2) as usize],
            WORDS[(r.next() % WORDS.len() as u64) as usize],
            r.next(),
            r.next() % 50_000,
            WORDS[(r.next() % WORDS.len() as u64) as usize],
            WORDS[(r.next() % WORDS.len() as u64) as usize],
            r.next() % 5000
        );
        v.extend_from_slice(line.as_bytes());
    }
    v.truncate(n);
    v
}

/// 64 MiB alternating 4 MiB stretches of text and random bytes.
fn mixed(n: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(n);
    let mut i = 0u64;
    while v.len() < n {
        let piece = if i.is_multiple_of(2) { text_bytes(4 * MIB, i) } else { random_bytes(4 * MIB, i) };
        v.extend_from_slice(&piece);
        i += 1;
    }
    v.truncate(n);
    v
}

fn keys() -> Keys {
    Keys::from_master(SecretKey([7u8; 32]))
}

fn chunking(c: &mut Criterion) {
    let data = mixed(64 * MIB);
    let params = ChunkerParams::default();
    let chunker = Chunker::new(params, 0x1234_5678).expect("default chunker parameters are valid");
    let mut g = c.benchmark_group("chunking");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("hoard Chunker (seeded FastCDC 512K/1M/8M)", |b| {
        b.iter(|| black_box(chunker.chunks(black_box(&data)).count()))
    });
    g.bench_function("raw fastcdc::v2020::FastCDC 512K/1M/8M", |b| {
        b.iter(|| {
            black_box(
                fastcdc::v2020::FastCDC::new(
                    black_box(&data),
                    params.min as usize,
                    params.avg as usize,
                    params.max as usize,
                )
                .count(),
            )
        })
    });
    let small = Chunker::new(ChunkerParams { min: 64 * 1024, avg: 256 * 1024, max: 1024 * 1024 }, 0x1234_5678)
        .expect("valid chunker parameters");
    g.bench_function("hoard Chunker 64K/256K/1M (smaller chunks)", |b| {
        b.iter(|| black_box(small.chunks(black_box(&data)).count()))
    });
    g.bench_function("hoard zero-chunk check (util::is_zero, non-zero data)", |b| {
        // The worst case is an all-zero buffer (scans everything); for data it stops early, so
        // measure the all-zero case on 64 MiB.
        let zeros = vec![0u8; data.len()];
        b.iter(|| black_box(hoard_core::util::is_zero(black_box(&zeros))))
    });
    g.finish();
}

fn hashing(c: &mut Criterion) {
    let k = keys();
    let chunk = random_bytes(MIB, 11);
    let mut g = c.benchmark_group("hashing 1 MiB chunk");
    g.throughput(Throughput::Bytes(chunk.len() as u64));
    g.bench_function("hoard Keys::blob_id (keyed BLAKE3)", |b| b.iter(|| black_box(k.blob_id(black_box(&chunk)))));
    g.bench_function("raw blake3::hash", |b| b.iter(|| black_box(blake3::hash(black_box(&chunk)))));
    g.bench_function("raw sha2::Sha256 (for comparison)", |b| {
        use sha2::Digest;
        b.iter(|| black_box(sha2::Sha256::digest(black_box(&chunk))))
    });
    g.finish();
    let pack = random_bytes(16 * MIB, 12);
    let mut g = c.benchmark_group("hashing 16 MiB pack");
    g.throughput(Throughput::Bytes(pack.len() as u64));
    g.bench_function("hoard Id::of_bytes (pack name, BLAKE3 of the whole pack)", |b| {
        b.iter(|| black_box(Id::of_bytes(black_box(&pack))))
    });
    g.finish();
}

fn compression(c: &mut Criterion) {
    let text = text_bytes(MIB, 21);
    let random = random_bytes(MIB, 22);
    let mut g = c.benchmark_group("zstd 1 MiB chunk");
    g.throughput(Throughput::Bytes(MIB as u64));
    for (name, data) in [("text", &text), ("random", &random)] {
        for level in [1, 3] {
            let mut comp = zstd::bulk::Compressor::new(level).expect("zstd compressor");
            g.bench_with_input(BenchmarkId::new(format!("zstd level {level} compress"), name), data, |b, d| {
                b.iter(|| black_box(comp.compress(black_box(d)).map(|v| v.len())))
            });
        }
        // What the writer does for a data blob: compress a 16 KiB sample from the middle with
        // level 1 and only compress the whole chunk if the sample shrank by >= 3 %.
        let mut sample = zstd::bulk::Compressor::new(1).expect("zstd compressor");
        let mut comp = zstd::bulk::Compressor::new(1).expect("zstd compressor");
        g.bench_with_input(BenchmarkId::new("hoard writer policy (sample, then zstd-1)", name), data, |b, d| {
            b.iter(|| {
                let mid = d.len() / 2;
                let s = sample.compress(&d[mid - 8192..mid + 8192]).map(|v| v.len()).unwrap_or(0);
                if s < 16384 * 97 / 100 { black_box(comp.compress(black_box(d)).map(|v| v.len())) } else { Ok(0) }
            })
        });
        let compressed = zstd::bulk::compress(data, 1).expect("zstd");
        g.bench_with_input(BenchmarkId::new("zstd decompress", name), &compressed, |b, d| {
            b.iter(|| black_box(zstd::bulk::decompress(black_box(d), 2 * MIB).map(|v| v.len())))
        });
    }
    g.finish();
}

fn sealing(c: &mut Criterion) {
    let k = keys();
    let raw_key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[9u8; 32]).expect("AES-256 key"));
    for size in [MIB, 4096] {
        let data = random_bytes(size, 31);
        let id = k.blob_id(&data);
        let label = if size == MIB { "1 MiB".to_string() } else { format!("{size} B") };
        let mut g = c.benchmark_group(format!("AES-256-GCM {label} blob"));
        g.throughput(Throughput::Bytes(size as u64));
        let mut out = Vec::with_capacity(size + SEAL_OVERHEAD);
        g.bench_function("hoard Keys::seal_blob (per-blob key + random nonce + copy)", |b| {
            b.iter(|| {
                out.clear();
                k.seal_blob(SealType::DataBlob, &id, black_box(&data), &mut out);
                black_box(out.len())
            })
        });
        let mut buf = data.clone();
        g.bench_function("raw aws_lc_rs seal_in_place (fixed key, zero nonce, no copy)", |b| {
            b.iter(|| {
                let tag = raw_key
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key([0u8; 12]),
                        Aad::from(&[1u8; 40]),
                        &mut buf,
                    )
                    .expect("seal");
                black_box(tag)
            })
        });
        g.bench_function("raw aws_lc_rs key setup (UnboundKey + LessSafeKey)", |b| {
            b.iter(|| black_box(LessSafeKey::new(UnboundKey::new(&AES_256_GCM, black_box(&[5u8; 32])).expect("key"))))
        });
        let sealed = {
            let mut s = Vec::new();
            k.seal_blob(SealType::DataBlob, &id, &data, &mut s);
            s
        };
        g.bench_function("hoard Keys::open_blob (restore side)", |b| {
            b.iter(|| black_box(k.open_blob(SealType::DataBlob, &id, black_box(&sealed)).map(|v| v.len())))
        });
        g.finish();
    }
}

fn packing(c: &mut Criterion) {
    let k = keys();
    let blobs: Vec<SealedBlob> = (0..16u64)
        .map(|i| {
            let data = random_bytes(MIB, 40 + i);
            let id = k.blob_id(&data);
            let mut bytes = Vec::new();
            k.seal_blob(SealType::DataBlob, &id, &data, &mut bytes);
            SealedBlob {
                ty: BlobType::Data,
                compression: Compression::None,
                id,
                raw_len: MIB as u32,
                bytes: bytes.into(),
            }
        })
        .collect();
    let total: usize = blobs.iter().map(|b| b.bytes.len()).sum();
    let mut g = c.benchmark_group("pack assembly 16 x 1 MiB");
    g.throughput(Throughput::Bytes(total as u64));
    g.bench_function("hoard PackBuilder add + finish (no copy; header seal, BLAKE3 name)", |b| {
        let copies = || {
            blobs
                .iter()
                .map(|s| SealedBlob {
                    ty: s.ty,
                    compression: s.compression,
                    id: s.id,
                    raw_len: s.raw_len,
                    bytes: s.bytes.clone(),
                })
                .collect::<Vec<_>>()
        };
        b.iter_batched(
            copies,
            |owned| {
                let mut pb = PackBuilder::default();
                for blob in owned {
                    pb.add(blob);
                }
                black_box(pb.finish(&k).map(|p| p.len))
            },
            criterion::BatchSize::LargeInput,
        )
    });
    g.bench_function("raw memcpy into a preallocated Vec", |b| {
        b.iter(|| {
            let mut v = Vec::with_capacity(total + total / 8);
            for blob in &blobs {
                v.extend_from_slice(&blob.bytes);
            }
            black_box(v.len())
        })
    });
    g.finish();
}

/// hash + (policy) compress + seal for one 1 MiB chunk: the per-core CPU budget of a worker.
fn pipeline(c: &mut Criterion) {
    let k = keys();
    let text = text_bytes(MIB, 51);
    let random = random_bytes(MIB, 52);
    let mut g = c.benchmark_group("per-chunk pipeline 1 MiB (id + sample/zstd-1 + seal)");
    g.throughput(Throughput::Bytes(MIB as u64));
    let mut sample = zstd::bulk::Compressor::new(1).expect("zstd compressor");
    let mut comp = zstd::bulk::Compressor::new(1).expect("zstd compressor");
    for (name, data) in [("text", &text), ("random", &random)] {
        g.bench_with_input(BenchmarkId::from_parameter(name), data, |b, d| {
            b.iter(|| {
                let id = k.blob_id(d);
                let mid = d.len() / 2;
                let s = sample.compress(&d[mid - 8192..mid + 8192]).map(|v| v.len()).unwrap_or(0);
                let compressed = if s < 16384 * 97 / 100 { comp.compress(d).ok() } else { None };
                let payload: &[u8] = compressed.as_deref().filter(|c| c.len() < d.len()).unwrap_or(d);
                let mut out = Vec::with_capacity(payload.len() + SEAL_OVERHEAD);
                k.seal_blob(SealType::DataBlob, &id, payload, &mut out);
                black_box(out.len())
            })
        });
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(10)
        .configure_from_args()
}

criterion_group! {
    name = stages;
    config = config();
    targets = chunking, hashing, compression, sealing, packing, pipeline
}
criterion_main!(stages);
