//! NCCL backend on real GPUs (build with `--features nccl`; run by gpu-check.sh).
#![cfg(feature = "nccl")]

use std::time::{Duration, Instant};

use ringmaster_collective::{
    Communicator, ReduceOp, RendezvousConfig, StoreClient, Token, bf16, connect_nccl,
};

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

/// NCCL's own rendezvous is bounded too: rank 1 joins the store and announces itself but
/// never starts NCCL, so rank 0's non-blocking init must give up at the deadline (aborting
/// the half-built communicator) instead of waiting forever.
#[test]
fn nccl_init_gives_up_when_a_rank_never_arrives() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let token = Token::new("gpu-check").unwrap();
    let mut cfg = RendezvousConfig::new(0, 2, "127.0.0.1", port, token.clone());
    cfg.rendezvous_timeout = Duration::from_secs(8);
    let silent_rank = std::thread::spawn(move || {
        let addr = format!("127.0.0.1:{port}");
        let mut store = StoreClient::connect(&addr, &token, Duration::from_secs(10)).unwrap();
        store.set("nccl/world/1", b"2").unwrap();
        std::thread::sleep(Duration::from_secs(12));
    });
    let t = Instant::now();
    let err = connect_nccl(&cfg, 0)
        .err()
        .expect("init cannot complete without rank 1");
    let took = t.elapsed();
    assert!(took < Duration::from_secs(20), "took {took:?}");
    assert!(
        err.to_string()
            .contains("NCCL communicator set-up of rank 0"),
        "{err}"
    );
    silent_rank.join().unwrap();
}
