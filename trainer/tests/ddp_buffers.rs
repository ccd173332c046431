//! Buffers (BatchNorm running statistics and counts) under DDP: rank 0's values at start,
//! averaged on demand, never in a gradient bucket. Ranks are threads joined over real
//! sockets.

use std::net::TcpListener;
use std::time::Duration;

use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::Init;
use ringmaster_collective::TcpRing;
use ringmaster_collective::{RendezvousConfig, Token, connect_tcp};
use ringmaster_nn::models::batch_norm::BatchNorm2d;
use ringmaster_trainer::ddp::{Ddp, DdpConfig};
use ringmaster_trainer::params::{ModelVars, NamePatterns, default_buffer_patterns};

fn values(vars: &ModelVars, name: &str) -> Vec<f32> {
    let v = vars.all().into_iter().find(|v| v.name == name).unwrap();
    v.var.flatten_all().unwrap().to_vec1().unwrap()
}

/// Runs `rank_fn(rank, communicator)` on `world` threads joined into one TCP ring.
fn on_ranks<T: Send>(world: usize, rank_fn: impl Fn(usize, TcpRing) -> T + Sync) -> Vec<T> {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let rank_fn = &rank_fn;
                s.spawn(move || {
                    let mut cfg = RendezvousConfig::new(
                        rank,
                        world,
                        "127.0.0.1",
                        port,
                        Token::new("buffers-test").unwrap(),
                    );
                    cfg.rendezvous_timeout = Duration::from_secs(20);
                    rank_fn(rank, connect_tcp(&cfg).unwrap())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn buffers_start_from_rank_0_and_average_on_demand() {
    let results = on_ranks(2, |rank, comm| {
        let vars = ModelVars::new(NamePatterns::default(), default_buffer_patterns());
        let vb = vars.var_builder(DType::F32, &Device::Cpu);
        let r = rank as f64;
        vb.get_with_hints(2, "bn.running_mean", Init::Const(10.0 + r))
            .unwrap();
        vb.get_with_hints(2, "bn.weight", Init::Const(1.0 + r))
            .unwrap();
        let mut ddp = Ddp::new(Box::new(comm), &vars, DdpConfig::default()).unwrap();
        let names = ddp.bucket_names().concat().join(",");
        let at_start = (values(&vars, "bn.running_mean"), values(&vars, "bn.weight"));
        let buffer = vars
            .all()
            .into_iter()
            .find(|v| v.name == "bn.running_mean")
            .unwrap();
        buffer
            .var
            .set(&Tensor::new(&[2f32 * (r as f32 + 1.0), 0.0], &Device::Cpu).unwrap())
            .unwrap();
        ddp.average_buffers(&vars).unwrap();
        (names, at_start, values(&vars, "bn.running_mean"))
    });
    for (names, (mean, weight), averaged) in results {
        assert_eq!(names, "bn.weight", "only the parameter is bucketed");
        assert_eq!(mean, [10.0, 10.0]);
        assert_eq!(weight, [1.0, 1.0]);
        assert_eq!(averaged, [3.0, 0.0]);
    }
}

/// A real BatchNorm built over `ModelVars`, which serves buffers detached: its training
/// updates must still land in the variables that DDP averages and checkpoints save, and
/// averaging the counts, equal on every rank, must leave them exact (3 ranks: the average
/// divides by 3).
#[test]
fn batch_norm_updates_reach_the_averaged_variables_and_counts_stay_exact() {
    const STEPS: i64 = 5;
    let results = on_ranks(3, |rank, comm| {
        let vars = ModelVars::new(NamePatterns::default(), default_buffer_patterns());
        let bn = BatchNorm2d::new(2, vars.var_builder(DType::F32, &Device::Cpu).pp("bn")).unwrap();
        let mut ddp = Ddp::new(Box::new(comm), &vars, DdpConfig::default()).unwrap();
        // Channel c of rank r: values (r + 1)(c + 1) -/+ 1, so its batch mean is (r + 1)(c + 1).
        let scale = (rank + 1) as f32;
        let x = Tensor::new(
            &[[
                [[scale - 1.0, scale + 1.0]],
                [[2.0 * scale - 1.0, 2.0 * scale + 1.0]],
            ]],
            &Device::Cpu,
        )
        .unwrap();
        for _ in 0..STEPS {
            bn.forward_t(&x, true).unwrap();
        }
        ddp.average_buffers(&vars).unwrap();
        let count = vars
            .all()
            .into_iter()
            .find(|v| v.name == "bn.num_batches_tracked")
            .unwrap();
        (
            count.var.as_tensor().to_scalar::<i64>().unwrap(),
            values(&vars, "bn.running_mean"),
        )
    });
    // Each rank's running mean is its batch mean times 1 - 0.9^5 (momentum 0.1 from 0);
    // the ranks' batch means average to 2(c + 1).
    let kept = 1.0 - 0.9f32.powi(STEPS as i32);
    for (count, mean) in results {
        assert_eq!(count, STEPS);
        for (c, m) in mean.iter().enumerate() {
            let want = 2.0 * (c + 1) as f32 * kept;
            assert!((m - want).abs() < 1e-5, "channel {c}: {m}, want {want}");
        }
    }
}
