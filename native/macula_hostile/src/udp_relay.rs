//! `udp-relay`: a NAT in the path that forwards datagrams untouched, each client from
//! a socket of its own.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;

use crate::{net, Res};

pub async fn run(listen: SocketAddr, target: SocketAddr) -> Res<i32> {
    let front = Arc::new(UdpSocket::bind(listen).await?);
    let mut clients: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let forwarded = Arc::new(AtomicU64::new(0));
    let returned = Arc::new(AtomicU64::new(0));
    println!("RELAY listening on {listen} forwarding to {target}");
    {
        let (forwarded, returned) = (forwarded.clone(), returned.clone());
        tokio::spawn(async move {
            let mut last = (0, 0);
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let now = (forwarded.load(Ordering::Relaxed), returned.load(Ordering::Relaxed));
                if now != last {
                    println!("RELAY datagrams to_target={} to_clients={}", now.0, now.1);
                    last = now;
                }
            }
        });
    }
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, from) = match front.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(_) => continue,
        };
        let upstream = match clients.get(&from) {
            Some(s) => s.clone(),
            None => {
                let s = Arc::new(UdpSocket::bind(net::local_for(target)).await?);
                s.connect(target).await?;
                println!("RELAY new client {from} mapped to {}", s.local_addr()?);
                let (s2, front2, returned) = (s.clone(), front.clone(), returned.clone());
                tokio::spawn(async move {
                    let mut back = vec![0u8; 65536];
                    loop {
                        match s2.recv(&mut back).await {
                            Ok(n) => {
                                let _ = front2.send_to(&back[..n], from).await;
                                returned.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
                        }
                    }
                });
                clients.insert(from, s.clone());
                s
            }
        };
        let _ = upstream.send(&buf[..n]).await;
        forwarded.fetch_add(1, Ordering::Relaxed);
    }
}
