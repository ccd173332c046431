//! The rendezvous store over real sockets: operations, authentication, hostile peers.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::config;
use ringmaster_collective::{Error, StoreClient, StoreServer, Token, connect_tcp};

fn server() -> (StoreServer, String) {
    let s = StoreServer::bind(
        "127.0.0.1:0".parse::<SocketAddr>().unwrap(),
        Token::new("secret").unwrap(),
    )
    .unwrap();
    let addr = s.local_addr().to_string();
    (s, addr)
}

fn client(addr: &str) -> StoreClient {
    StoreClient::connect(addr, &Token::new("secret").unwrap(), Duration::from_secs(5)).unwrap()
}

#[test]
fn set_get_add_wait_barrier() {
    let (_s, addr) = server();
    let mut a = client(&addr);
    let mut b = client(&addr);
    a.set("k", b"v1").unwrap();
    assert_eq!(b.get("k", Duration::from_secs(1)).unwrap(), b"v1");
    assert_eq!(b.try_get("missing").unwrap(), None);
    assert_eq!(a.add("c", 5).unwrap(), 5);
    assert_eq!(b.add("c", -2).unwrap(), 3);
    assert!(
        matches!(a.add("k", 1), Err(Error::Store { .. })),
        "a value is not a counter"
    );

    // get blocks until another client sets the key.
    let addr2 = addr.clone();
    let setter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        client(&addr2).set("late", b"here").unwrap();
    });
    let t = Instant::now();
    assert_eq!(a.get("late", Duration::from_secs(5)).unwrap(), b"here");
    assert!(t.elapsed() >= Duration::from_millis(150));
    setter.join().unwrap();

    let t = Instant::now();
    assert!(matches!(
        a.get("never", Duration::from_millis(300)),
        Err(Error::RendezvousTimeout { .. })
    ));
    assert!(t.elapsed() < Duration::from_secs(3));

    let addrs: Vec<String> = (0..4).map(|_| addr.clone()).collect();
    let hs: Vec<_> = addrs
        .into_iter()
        .map(|ad| std::thread::spawn(move || client(&ad).barrier("b1", 4, Duration::from_secs(5))))
        .collect();
    for h in hs {
        h.join().unwrap().unwrap();
    }
}

#[test]
fn wrong_token_is_rejected_and_the_store_survives() {
    let (_s, addr) = server();
    let err = StoreClient::connect(
        &addr,
        &Token::new("not-the-secret").unwrap(),
        Duration::from_secs(5),
    )
    .err()
    .expect("a wrong token must not connect");
    assert!(matches!(err, Error::Auth { .. }), "{err}");
    assert!(err.to_string().contains("RINGMASTER_TOKEN"), "{err}");
    let mut ok = client(&addr);
    ok.set("still", b"alive").unwrap();
}

#[test]
fn foreign_protocols_and_garbage_are_dropped_without_crashing() {
    let (_s, addr) = server();
    // An HTTP probe, random bytes, a truncated hello, and a connection that closes at once.
    for junk in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0xffu8; 100][..],
        &b"RMST\x01"[..],
        &b""[..],
    ] {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.write_all(junk).unwrap();
        let _ = s.shutdown(std::net::Shutdown::Write);
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        assert!(
            buf.is_empty() || buf.len() <= 70,
            "the store must only send its hello, got {} bytes",
            buf.len()
        );
    }
    // A client of another protocol version.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(b"RMST\x09\x00").unwrap();
    s.write_all(&[0u8; 32]).unwrap();
    let mut buf = [0u8; 1];
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(
        matches!(s.read(&mut buf), Ok(0) | Err(_)),
        "version mismatch closes the connection"
    );
    let mut ok = client(&addr);
    ok.set("k", b"v").unwrap();
    assert_eq!(ok.get("k", Duration::from_secs(1)).unwrap(), b"v");
}

#[test]
fn a_rank_with_the_wrong_token_cannot_join() {
    for (transport, name) in common::TRANSPORTS {
        wrong_token_case(transport, name);
    }
}

fn wrong_token_case(transport: ringmaster_collective::Transport, name: &'static str) {
    use ringmaster_collective::{Communicator, ReduceOp};
    let port = common::free_port();
    let config = move |rank| {
        let mut c = config(rank, 2, port);
        c.ring.transport = transport;
        c
    };
    // Large enough for the bulk path, which is what the transport carries.
    let all_reduce = move |cfg| {
        let mut c = connect_tcp(&cfg)?;
        assert_eq!(c.transport(), name);
        let mut v = vec![c.rank() as f32 + 1.0; 1 << 20];
        c.all_reduce_f32(&mut v, ReduceOp::Sum)?;
        Ok::<f32, Error>(v[v.len() - 1])
    };
    let rank0 = std::thread::spawn(move || all_reduce(config(0)));
    let mut bad = config(1);
    bad.token = Token::new("wrong").unwrap();
    bad.rendezvous_timeout = Duration::from_secs(3);
    let err = connect_tcp(&bad).err().expect("wrong token must fail");
    assert!(matches!(err, Error::Auth { .. }), "{name}: {err}");
    // The store keeps serving: the real rank 1 still joins and the job runs.
    assert_eq!(all_reduce(config(1)).unwrap(), 3.0);
    assert_eq!(rank0.join().unwrap().unwrap(), 3.0);
}
