//! Collectives against serial references, ranks as threads over real loopback sockets.

mod common;

use common::{integer_floats, per_transport, random_floats, run_configured_ranks, run_ranks};
use ringmaster_collective::{Communicator, Error, ReduceOp, RingConfig, bf16};

/// Small chunks and a small fast-path threshold exercise many chunks, both paths and
/// uneven chunk counts per connection on modest buffers.
fn tight() -> RingConfig {
    RingConfig {
        chunk_bytes: 4096,
        small_max_bytes: 256,
        streams: 3,
        ..RingConfig::default()
    }
}

fn check_all_reduce(n: usize, len: usize, ring: RingConfig, order: Option<Vec<usize>>) {
    for (ring, transport) in per_transport(ring) {
        check_all_reduce_on(n, len, ring, order.clone(), transport);
    }
}

fn check_all_reduce_on(
    n: usize,
    len: usize,
    ring: RingConfig,
    order: Option<Vec<usize>>,
    transport: &str,
) {
    let inputs: Vec<Vec<f32>> = (0..n).map(|r| integer_floats(len, r)).collect();
    let exact: Vec<f32> = (0..len)
        .map(|i| inputs.iter().map(|v| v[i]).sum())
        .collect();
    let randoms: Vec<Vec<f32>> = (0..n).map(|r| random_floats(len, r, len as u64)).collect();
    let results = run_ranks(n, ring, order, |c| {
        if n > 1 {
            assert_eq!(c.transport(), transport);
        }
        let r = c.rank();
        let mut a = inputs[r].clone();
        c.all_reduce_f32(&mut a, ReduceOp::Sum).unwrap();
        let mut b = randoms[r].clone();
        c.all_reduce_f32(&mut b, ReduceOp::Sum).unwrap();
        (a, b)
    });
    for (rank, (a, b)) in results.iter().enumerate() {
        assert!(
            a == &exact,
            "{transport}: world {n} len {len}: rank {rank} differs from the exact sum"
        );
        for i in 0..len {
            let mag: f32 = randoms.iter().map(|v| v[i].abs()).sum();
            let want: f32 = randoms.iter().map(|v| v[i]).sum();
            assert!(
                (b[i] - want).abs() <= 1e-6 * mag + 1e-30,
                "{transport}: world {n} len {len} rank {rank} elem {i}: {} vs {want}",
                b[i]
            );
        }
        assert_eq!(b, &results[0].1, "every rank must hold identical bits");
    }
}

#[test]
fn all_reduce_matches_reference_for_world_sizes_1_to_5() {
    for n in 1..=5 {
        for len in [0, 1, 2, 3, 5, 63, 64, 65, 1000, 4099, 65_537] {
            check_all_reduce(n, len, tight(), None);
        }
        check_all_reduce(n, 300_001, RingConfig::default(), None);
    }
}

#[test]
fn all_reduce_64_mib_with_odd_length() {
    // 64 MiB plus 3 floats: not divisible by the world size, uses the default tuning.
    check_all_reduce(3, (64 << 20) / 4 + 3, RingConfig::default(), None);
}

#[test]
fn ring_order_is_an_input() {
    for len in [7, 50_000] {
        check_all_reduce(4, len, tight(), Some(vec![2, 0, 3, 1]));
        check_all_reduce(
            5,
            len,
            RingConfig {
                streams: 1,
                ..tight()
            },
            Some(vec![4, 3, 2, 1, 0]),
        );
    }
}

/// Ranks 0 and 2 on node-a, 1 and 3 on node-b: every rank must choose the ring 0,2,1,3
/// from the published locations and still sum right; an explicit order wins over them.
#[test]
fn ring_order_follows_placement() {
    let (n, len) = (4, 50_000);
    let inputs: Vec<Vec<f32>> = (0..n).map(|r| integer_floats(len, r)).collect();
    let exact: Vec<f32> = (0..len)
        .map(|i| inputs.iter().map(|v| v[i]).sum())
        .collect();
    for (explicit, want) in [(None, [0, 2, 1, 3]), (Some(vec![3, 1, 2, 0]), [3, 1, 2, 0])] {
        for (ring, transport) in per_transport(tight()) {
            let out = run_configured_ranks(
                n,
                |cfg| {
                    cfg.ring = ring.clone();
                    cfg.ring_order = explicit.clone();
                    let node = if cfg.rank % 2 == 0 {
                        "node-a"
                    } else {
                        "node-b"
                    };
                    cfg.location.node = Some(node.into());
                },
                |c| {
                    assert_eq!(c.transport(), transport);
                    let mut big = inputs[c.rank()].clone();
                    c.all_reduce_f32(&mut big, ReduceOp::Sum).unwrap();
                    let mut small = [c.rank() as f32 + 1.0];
                    c.all_reduce_f32(&mut small, ReduceOp::Sum).unwrap();
                    (c.ring_order().map(<[usize]>::to_vec), big, small[0])
                },
            );
            for (rank, (order, big, small)) in out.into_iter().enumerate() {
                let what = format!("{transport}, explicit order {explicit:?}, rank {rank}");
                assert_eq!(order.as_deref(), Some(&want[..]), "{what}");
                assert!(
                    big == exact,
                    "{what}: bulk all-reduce differs from the exact sum"
                );
                assert_eq!(small, 10.0, "{what}: small all-reduce");
            }
        }
    }
}

#[test]
fn average_and_bf16() {
    let n = 4;
    for (ring, _) in per_transport(tight()) {
        average_and_bf16_on(n, ring);
    }
}

fn average_and_bf16_on(n: usize, ring: RingConfig) {
    let out = run_ranks(n, ring, None, |c| {
        let r = c.rank() as f32;
        let mut f = vec![r * 2.0; 10_001];
        c.all_reduce_f32(&mut f, ReduceOp::Avg).unwrap();
        let mut h = vec![bf16::from_f32(r + 1.0); 5_003];
        c.all_reduce_bf16(&mut h, ReduceOp::Sum).unwrap();
        let mut g = vec![bf16::from_f32(r + 1.0); 3];
        c.all_reduce_bf16(&mut g, ReduceOp::Avg).unwrap();
        (f, h, g)
    });
    for (f, h, g) in out {
        assert!(f.iter().all(|&x| x == 3.0));
        assert!(h.iter().all(|&x| x == bf16::from_f32(10.0)));
        assert!(g.iter().all(|&x| x == bf16::from_f32(2.5)));
    }
}

#[test]
fn broadcast_and_all_gather() {
    for n in 1..=5 {
        for len in [0, 1, 13, 70_001] {
            let root = n / 2;
            for (ring, transport) in per_transport(tight()) {
                let out = run_ranks(n, ring, None, |c| {
                    let r = c.rank();
                    let mut b = integer_floats(len, r);
                    c.broadcast_f32(&mut b, root).unwrap();
                    let input = integer_floats(len, r);
                    let mut g = vec![f32::NAN; len * n];
                    c.all_gather_f32(&input, &mut g).unwrap();
                    c.barrier().unwrap();
                    (b, g)
                });
                let want_g: Vec<f32> = (0..n).flat_map(|r| integer_floats(len, r)).collect();
                for (b, g) in out {
                    assert_eq!(
                        b,
                        integer_floats(len, root),
                        "{transport}: broadcast world {n} len {len}"
                    );
                    assert_eq!(g, want_g, "{transport}: all_gather world {n} len {len}");
                }
            }
        }
    }
}

#[test]
fn many_small_ops_in_a_row_keep_in_step() {
    let out = run_ranks(3, RingConfig::default(), None, |c| {
        let mut total = 0.0;
        for i in 0..300 {
            let mut v = [c.rank() as f32 + i as f32];
            c.all_reduce_f32(&mut v, ReduceOp::Sum).unwrap();
            total += v[0];
        }
        total
    });
    let want: f32 = (0..300).map(|i| 3.0 + 3.0 * i as f32).sum();
    assert!(out.iter().all(|&t| t == want));
}

#[test]
fn mismatched_buffer_sizes_are_reported_naming_the_ranks() {
    for len in [10usize, 100_000] {
        for (ring, _) in per_transport(RingConfig::default()) {
            let out = run_ranks(3, ring, None, |c| {
                let n = if c.rank() == 1 { len + 1 } else { len };
                let mut v = vec![1.0f32; n];
                let first = c.all_reduce_f32(&mut v, ReduceOp::Sum);
                // Once failed, the communicator refuses further use instead of desynchronising.
                let second = c.barrier();
                (first, second)
            });
            let errs: Vec<String> = out
                .iter()
                .filter_map(|(r, _)| r.as_ref().err().map(|e| e.to_string()))
                .collect();
            assert!(!errs.is_empty());
            assert!(
                errs.iter().any(|e| e.contains("disagree")
                    && e.contains("rank 1")
                    && e.contains(&format!("{} f32", len + 1))),
                "{errs:#?}"
            );
            for (first, second) in &out {
                if first.is_err() {
                    assert!(matches!(second, Err(Error::Poisoned(_))), "{second:?}");
                }
            }
        }
    }
}

#[test]
fn all_gather_rejects_a_wrong_output_length_without_poisoning() {
    let out = run_ranks(2, RingConfig::default(), None, |c| {
        let bad = c.all_gather_f32(&[1.0; 4], &mut [0.0; 7]);
        let mut v = [1.0f32; 4];
        c.all_reduce_f32(&mut v, ReduceOp::Sum).unwrap();
        (bad.is_err(), v)
    });
    assert!(out.iter().all(|(bad, v)| *bad && *v == [2.0; 4]));
}
