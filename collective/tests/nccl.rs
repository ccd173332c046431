//! NCCL backend on real GPUs (build with `--features nccl`; run by gpu-check.sh).
#![cfg(feature = "nccl")]

use ringmaster_collective::{Communicator, ReduceOp, RendezvousConfig, Token, bf16, connect_nccl};

fn single_rank() -> ringmaster_collective::NcclCommunicator {
    let cfg = RendezvousConfig::new(0, 1, "127.0.0.1", 0, Token::new("gpu-check").unwrap());
    connect_nccl(&cfg, 0).expect("NCCL world of one on GPU 0")
}

#[test]
fn nccl_world_of_one_host_and_device_buffers() {
    let mut c = single_rank();
    assert_eq!((c.rank(), c.world_size(), c.backend()), (0, 1, "nccl"));
    let mut v: Vec<f32> = (0..1_000_003).map(|i| (i % 1000) as f32).collect();
    let want = v.clone();
    c.all_reduce_f32(&mut v, ReduceOp::Sum).unwrap();
    assert_eq!(v, want);
    c.all_reduce_f32(&mut v, ReduceOp::Avg).unwrap();
    assert_eq!(v, want);
    let mut h = vec![bf16::from_f32(3.0); 4097];
    c.all_reduce_bf16(&mut h, ReduceOp::Sum).unwrap();
    assert!(h.iter().all(|&x| x == bf16::from_f32(3.0)));
    let mut b = vec![7.0f32; 33];
    c.broadcast_f32(&mut b, 0).unwrap();
    assert_eq!(b, vec![7.0; 33]);
    let mut g = vec![0.0f32; 5];
    c.all_gather_f32(&[1.0, 2.0, 3.0, 4.0, 5.0], &mut g)
        .unwrap();
    assert_eq!(g, [1.0, 2.0, 3.0, 4.0, 5.0]);
    c.barrier().unwrap();

    let stream = c.stream().clone();
    let mut dev = stream.clone_htod(&want).unwrap();
    c.all_reduce_device(&mut dev, ReduceOp::Sum).unwrap();
    assert_eq!(stream.clone_dtoh(&dev).unwrap(), want);
}
