//! Buffers (BatchNorm running statistics) under DDP: rank 0's values at start, averaged
//! on demand, never in a gradient bucket. Ranks are threads joined over real sockets.

use std::net::TcpListener;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use candle_nn::Init;
use ringmaster_collective::{RendezvousConfig, Token, connect_tcp};
use ringmaster_trainer::ddp::{Ddp, DdpConfig};
use ringmaster_trainer::params::{ModelVars, NamePatterns, default_buffer_patterns};

fn values(vars: &ModelVars, name: &str) -> Vec<f32> {
    let v = vars.all().into_iter().find(|v| v.name == name).unwrap();
    v.var.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn buffers_start_from_rank_0_and_average_on_demand() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2usize)
            .map(|rank| {
                s.spawn(move || {
                    let mut cfg = RendezvousConfig::new(
                        rank,
                        2,
                        "127.0.0.1",
                        port,
                        Token::new("buffers-test").unwrap(),
                    );
                    cfg.rendezvous_timeout = Duration::from_secs(20);
                    let comm = connect_tcp(&cfg).unwrap();
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
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (names, (mean, weight), averaged) in results {
        assert_eq!(names, "bn.weight", "only the parameter is bucketed");
        assert_eq!(mean, [10.0, 10.0]);
        assert_eq!(weight, [1.0, 1.0]);
        assert_eq!(averaged, [3.0, 0.0]);
    }
}
