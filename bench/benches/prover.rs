//! The prover sweep: proving time per batch capacity, against the multi-scalar multiplications
//! (MSMs) the Groth16 prover cannot avoid, measured in the same run on the same machine.
//!
//! For each capacity (16, 64, 256, 1024 ticks; up to `SHALE_BENCH_PROVER_MAX`, e.g. 4096) it makes
//! keys once from a fixed seed, proves one full batch outside the timing (the first proof of a key
//! builds the constraint matrices), then times four things:
//!
//! - `prove/N`: [`ProvingKey::prove`] of the full batch, everything a settler pays for;
//! - `arkworks/N`: the same proof the way this crate made it before its own MSMs: witness
//!   synthesis, then ark-groth16's `create_proof_with_reduction_and_matrices` on the same cached
//!   matrices (arkworks' QAP and arkworks' MSMs). The before of `prove/N`, in the same run;
//! - `msm_bound/N`: only arkworks' five MSMs of that proof (A, B in G1, B in G2 over the full
//!   assignment, L over the witness, H over the quotient polynomial), over the proving key's own
//!   bases and with the proof's own scalars: the floor `arkworks/N` approaches. `prove/N` computes
//!   the same MSMs with batch-affine buckets and goes below it;
//! - `msm_dense/N`: arkworks' MSMs with uniformly random scalars. arkworks' MSM sorts scalars by
//!   size and adds the many 0/1 range-check bits of a witness almost for free, so this dense figure
//!   is an upper reference, not the bound.
//!
//! A table with one line per capacity follows criterion's output, in wall and in CPU seconds of
//! this process, with ticks proven per core-second (capacity / CPU seconds of one proof) for
//! `prove/N` and `arkworks/N`. CPU time is the steady measure: on a machine shared with other work
//! wall times swing from one group to the next, CPU time much less.
//!
//! ```text
//! cargo bench -p shale-bench --bench prover
//! SHALE_BENCH_PROVER_MAX=4096 cargo bench -p shale-bench --bench prover   # setup takes minutes
//! ```

use std::cell::RefCell;
use std::time::{Duration, Instant};

use ark_bn254::{Bn254, Fr, G1Projective, G2Projective};
use ark_ec::VariableBaseMSM;
use ark_ff::{PrimeField, UniformRand};
use ark_groth16::r1cs_to_qap::{LibsnarkReduction, R1CSToQAP};
use ark_groth16::Groth16;
use ark_poly::GeneralEvaluationDomain;
use ark_relations::gr1cs::{
    ConstraintSynthesizer, ConstraintSystem, Matrix, OptimizationGoal, SynthesisMode,
    R1CS_PREDICATE_LABEL,
};
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use shale_circuits::{setup_from_seed, Head, ProvingKey, TickBatch, TickBatchCircuit, TickFields};

const DEFAULT_MAX: usize = 1024;
const SAMPLES: usize = 10;
const SEED: u64 = 1;

type BigInt = <Fr as PrimeField>::BigInt;

/// The scalars of the five MSMs of one proof, in the order the prover lays them out.
struct MsmScalars {
    /// The full assignment without the constant one (A, B in G1, B in G2).
    assignment: Vec<BigInt>,
    /// The witness part of the assignment (L).
    witness: Vec<BigInt>,
    /// The coefficients of the quotient polynomial h (H).
    h: Vec<BigInt>,
}

/// The circuit's R1CS matrices, as the proving key caches them.
struct Shape {
    matrices: Vec<Matrix<Fr>>,
    num_instance_variables: usize,
    num_constraints: usize,
}

impl Shape {
    /// Synthesizes the blank circuit as setup does, so that the matrices match the key.
    fn of(capacity: usize) -> Self {
        let cs = ConstraintSystem::<Fr>::new_ref();
        cs.set_optimization_goal(OptimizationGoal::Constraints);
        cs.set_mode(SynthesisMode::Setup);
        TickBatchCircuit::blank(capacity)
            .expect("capacity is not zero")
            .generate_constraints(cs.clone())
            .expect("synthesis");
        cs.finalize();
        Shape {
            matrices: cs
                .to_matrices()
                .expect("matrices")
                .remove(R1CS_PREDICATE_LABEL)
                .expect("an R1CS"),
            num_instance_variables: cs.num_instance_variables(),
            num_constraints: cs.num_constraints(),
        }
    }
}

/// What one capacity is measured with, made once outside every timed loop.
struct Fixture {
    constraints: usize,
    pk: ProvingKey,
    shape: Shape,
    batch: TickBatch,
    proof_bytes: usize,
    /// The scalars of the proof of `batch`, recomputed the way the prover computes them.
    real: MsmScalars,
    /// Uniformly random scalars of the same lengths.
    dense: MsmScalars,
    /// One warm run of each timed thing, to size criterion's measurement time.
    first_prove: Duration,
    first_arkworks: Duration,
    first_msm: Duration,
    first_dense: Duration,
}

fn full_batch(capacity: usize) -> TickBatch {
    let ticks = (0..capacity as u64)
        .map(|seq| TickFields {
            order: 3,
            seq,
            seconds: 10,
            bytes_in: 1 << 20,
            bytes_out: 1 << 24,
        })
        .collect();
    // Any deployment: proving costs the same under every order key.
    let key = shale_circuits::OrderKey::new(31337, [0x5f; 20], 3);
    TickBatch::new(key, Head::GENESIS, None, ticks).expect("a full batch is valid")
}

impl Fixture {
    fn new(capacity: usize) -> Self {
        eprintln!("capacity {capacity}: setup (seed {SEED})...");
        let t = Instant::now();
        let (pk, _vk) = setup_from_seed(capacity, SEED).expect("setup");
        eprintln!("capacity {capacity}: setup took {:.1?}", t.elapsed());
        let batch = full_batch(capacity);
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        // The first proof of a key also builds the constraint matrices the key then keeps.
        let proof = pk.prove(&batch, &mut rng).expect("prove");
        let t = Instant::now();
        pk.prove(&batch, &mut rng).expect("prove");
        let first_prove = t.elapsed();

        let (constraints, real) = real_scalars(&pk, &batch);
        let dense = MsmScalars {
            assignment: random_scalars(real.assignment.len(), &mut rng),
            witness: random_scalars(real.witness.len(), &mut rng),
            h: random_scalars(real.h.len(), &mut rng),
        };
        let mut fixture = Fixture {
            constraints,
            pk,
            shape: Shape::of(capacity),
            batch,
            proof_bytes: proof.to_bytes().len(),
            real,
            dense,
            first_prove,
            first_arkworks: Duration::ZERO,
            first_msm: Duration::ZERO,
            first_dense: Duration::ZERO,
        };
        let t = Instant::now();
        std::hint::black_box(fixture.arkworks_prove(&mut rng));
        fixture.first_arkworks = t.elapsed();
        let t = Instant::now();
        std::hint::black_box(&fixture.msms(&fixture.real));
        fixture.first_msm = t.elapsed();
        let t = Instant::now();
        std::hint::black_box(&fixture.msms(&fixture.dense));
        fixture.first_dense = t.elapsed();
        fixture
    }

    /// The proof of the batch as this crate made it with arkworks' prover: witness synthesis,
    /// then arkworks' QAP and MSMs over the cached matrices.
    fn arkworks_prove(&self, rng: &mut ChaCha20Rng) -> ark_groth16::Proof<Bn254> {
        let cs = ConstraintSystem::<Fr>::new_ref();
        cs.set_optimization_goal(OptimizationGoal::Constraints);
        cs.set_mode(SynthesisMode::Prove {
            construct_matrices: false,
            generate_lc_assignments: false,
        });
        self.batch
            .circuit(self.pk.capacity())
            .expect("batch fits its key")
            .generate_constraints(cs.clone())
            .expect("synthesis");
        cs.finalize();
        let assignment = [
            cs.instance_assignment().expect("instance"),
            cs.witness_assignment().expect("witness"),
        ]
        .concat();
        let (r, s) = (Fr::rand(rng), Fr::rand(rng));
        Groth16::<Bn254>::create_proof_with_reduction_and_matrices(
            self.pk.inner(),
            r,
            s,
            &self.shape.matrices,
            self.shape.num_instance_variables,
            self.shape.num_constraints,
            &assignment,
        )
        .expect("prove")
    }

    /// The five MSMs of a Groth16 proof (ark-groth16 0.6's `create_proof_with_assignment`), over
    /// this key's bases; the query's first base, multiplied by the constant one, is an addition.
    fn msms(&self, s: &MsmScalars) -> (G1Projective, G1Projective, G1Projective, G2Projective) {
        let key = self.pk.inner();
        let h = G1Projective::msm_bigint(&key.h_query[..s.h.len()], &s.h);
        let l = G1Projective::msm_bigint(&key.l_query, &s.witness);
        let a = G1Projective::msm_bigint(&key.a_query[1..], &s.assignment);
        let b_g1 = G1Projective::msm_bigint(&key.b_g1_query[1..], &s.assignment);
        let b_g2 = G2Projective::msm_bigint(&key.b_g2_query[1..], &s.assignment);
        (h + l, a, b_g1, b_g2)
    }
}

/// Synthesizes the batch's circuit as the prover does and returns its constraint count and the
/// scalars of its MSMs.
fn real_scalars(pk: &ProvingKey, batch: &TickBatch) -> (usize, MsmScalars) {
    let cs = ConstraintSystem::<Fr>::new_ref();
    cs.set_optimization_goal(OptimizationGoal::Constraints);
    batch
        .circuit(pk.capacity())
        .expect("batch fits its key")
        .generate_constraints(cs.clone())
        .expect("synthesis");
    cs.finalize();
    assert!(cs.is_satisfied().expect("satisfiable"), "a valid witness");
    let h = LibsnarkReduction::witness_map::<Fr, GeneralEvaluationDomain<Fr>>(cs.clone())
        .expect("witness map");
    let instance = cs.instance_assignment().expect("instance");
    let witness = cs.witness_assignment().expect("witness");
    let key = pk.inner();
    assert_eq!(
        instance.len() + witness.len(),
        key.a_query.len(),
        "the key's variables are the circuit's"
    );
    assert_eq!(witness.len(), key.l_query.len());
    // The prover's MSM over H takes as many coefficients as the key has bases.
    let h_len = h.len().min(key.h_query.len());
    let bigints = |v: &[Fr]| v.iter().map(|f| f.into_bigint()).collect::<Vec<_>>();
    let scalars = MsmScalars {
        assignment: bigints(&[&instance[1..], &witness[..]].concat()),
        witness: bigints(&witness),
        h: bigints(&h[..h_len]),
    };
    (cs.num_constraints(), scalars)
}

fn random_scalars(n: usize, rng: &mut ChaCha20Rng) -> Vec<BigInt> {
    (0..n).map(|_| Fr::rand(rng).into_bigint()).collect()
}

/// Capacities 16, 64, 256, … up to `SHALE_BENCH_PROVER_MAX` (default 1024).
fn capacities() -> Vec<usize> {
    let max = std::env::var("SHALE_BENCH_PROVER_MAX")
        .ok()
        .map(|v| {
            v.parse()
                .expect("SHALE_BENCH_PROVER_MAX is a number of ticks")
        })
        .unwrap_or(DEFAULT_MAX);
    std::iter::successors(Some(16), |c| Some(c * 4))
        .take_while(|c| *c <= max)
        .collect()
}

/// Per-iteration wall and CPU times of the calls criterion makes; the last `SAMPLES` are its
/// samples (the ones before are its warm-up).
#[derive(Default)]
struct Samples(RefCell<Vec<(Duration, f64)>>);

impl Samples {
    fn timed(&self, iters: u64, mut f: impl FnMut()) -> Duration {
        let (t, cpu) = (Instant::now(), cpu_seconds());
        for _ in 0..iters {
            f();
        }
        let elapsed = t.elapsed();
        let cpu = (cpu_seconds() - cpu) / iters as f64;
        self.0
            .borrow_mut()
            .push((elapsed / u32::try_from(iters).unwrap_or(u32::MAX), cpu));
        elapsed
    }

    /// Medians of the samples: wall time, and CPU seconds of this process.
    fn median(&self) -> Option<(Duration, f64)> {
        let all = self.0.borrow();
        let last = &all[all.len().saturating_sub(SAMPLES)..];
        if last.is_empty() {
            return None;
        }
        let mut wall: Vec<Duration> = last.iter().map(|s| s.0).collect();
        let mut cpu: Vec<f64> = last.iter().map(|s| s.1).collect();
        wall.sort();
        cpu.sort_by(f64::total_cmp);
        Some((wall[wall.len() / 2], cpu[cpu.len() / 2]))
    }
}

/// User + system CPU seconds of this process so far (Linux `/proc/self/stat`, 100 ticks per
/// second): steadier than wall time on a machine shared with other work.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th of them.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let ticks: u64 = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse::<u64>().ok())
        .sum();
    ticks as f64 / 100.0
}

/// Enough measurement time for `SAMPLES` single runs of something that took `once`, so that
/// criterion takes its samples without warning that they do not fit.
fn measurement_time(once: Duration) -> Duration {
    (once * (SAMPLES as u32 + 2)).max(Duration::from_secs(5))
}

struct Row {
    capacity: usize,
    constraints: usize,
    prove: Option<(Duration, f64)>,
    arkworks: Option<(Duration, f64)>,
    msm: Option<(Duration, f64)>,
    dense: Option<(Duration, f64)>,
    proof_bytes: usize,
}

fn bench_capacity(c: &mut Criterion, capacity: usize) -> Row {
    let fixture = Fixture::new(capacity);
    let mut rng = ChaCha20Rng::seed_from_u64(3);
    let (prove, arkworks) = (Samples::default(), Samples::default());
    let (msm, dense) = (Samples::default(), Samples::default());

    let provers: [(&str, &Samples, Duration); 2] = [
        ("prove", &prove, fixture.first_prove),
        ("arkworks", &arkworks, fixture.first_arkworks),
    ];
    for (name, samples, once) in provers {
        let mut group = c.benchmark_group(name);
        group
            .sample_size(SAMPLES)
            .sampling_mode(SamplingMode::Flat)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(measurement_time(once))
            .throughput(Throughput::Elements(capacity as u64));
        group.bench_function(BenchmarkId::from_parameter(capacity), |b| {
            b.iter_custom(|iters| {
                samples.timed(iters, || {
                    if name == "prove" {
                        std::hint::black_box(
                            fixture.pk.prove(&fixture.batch, &mut rng).expect("prove"),
                        );
                    } else {
                        std::hint::black_box(fixture.arkworks_prove(&mut rng));
                    }
                })
            })
        });
        group.finish();
    }

    for (name, scalars, samples, once) in [
        ("msm_bound", &fixture.real, &msm, fixture.first_msm),
        ("msm_dense", &fixture.dense, &dense, fixture.first_dense),
    ] {
        let mut group = c.benchmark_group(name);
        group
            .sample_size(SAMPLES)
            .sampling_mode(SamplingMode::Flat)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(measurement_time(once))
            .throughput(Throughput::Elements(capacity as u64));
        group.bench_function(BenchmarkId::from_parameter(capacity), |b| {
            b.iter_custom(|iters| {
                samples.timed(iters, || {
                    std::hint::black_box(&fixture.msms(scalars));
                })
            })
        });
        group.finish();
    }

    Row {
        capacity,
        constraints: fixture.constraints,
        prove: prove.median(),
        arkworks: arkworks.median(),
        msm: msm.median(),
        dense: dense.median(),
        proof_bytes: fixture.proof_bytes,
    }
}

/// The machine every figure belongs to: cores the prover may use and the CPU model.
fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cores} cores, {model}")
}

const HEADER: &str = "capacity constraints per-tick      prove   arkworks  ark-MSMs  ark-dense | prove-CPU  ticks/core-s | ark-CPU  ticks/core-s  ark-MSM-CPU | proof";

impl Row {
    fn line(&self) -> String {
        let secs = |d: Option<(Duration, f64)>| {
            d.map_or("-".into(), |d| format!("{:.3}s", d.0.as_secs_f64()))
        };
        let cpu = |d: Option<(Duration, f64)>| d.map_or("-".into(), |d| format!("{:.2}s", d.1));
        let rate = |d: Option<(Duration, f64)>| match d {
            Some((_, cpu)) if cpu > 0.0 => format!("{:.0}", self.capacity as f64 / cpu),
            _ => "-".into(),
        };
        format!(
            "{:>8} {:>11} {:>8.0} {:>10} {:>10} {:>9} {:>10} | {:>9} {:>13} | {:>7} {:>13} {:>12} | {:>3} B",
            self.capacity,
            self.constraints,
            self.constraints as f64 / self.capacity as f64,
            secs(self.prove),
            secs(self.arkworks),
            secs(self.msm),
            secs(self.dense),
            cpu(self.prove),
            rate(self.prove),
            cpu(self.arkworks),
            rate(self.arkworks),
            cpu(self.msm),
            self.proof_bytes,
        )
    }
}

fn print_table(rows: &[Row]) {
    println!(
        "\nprover sweep on {} (medians of {SAMPLES} samples; ticks/core-s = capacity / CPU-s)",
        machine()
    );
    println!("{HEADER}");
    for row in rows {
        println!("{}", row.line());
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let rows: Vec<Row> = capacities()
        .into_iter()
        .map(|capacity| {
            let row = bench_capacity(&mut c, capacity);
            // Each row as soon as it is measured: the large capacities take many minutes.
            eprintln!("{HEADER}\n{}", row.line());
            row
        })
        .collect();
    c.final_summary();
    print_table(&rows);
}
