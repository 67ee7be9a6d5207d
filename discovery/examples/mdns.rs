//! Advertise a fake worker, or list the workers of a cluster, over mDNS: a tool for
//! checking discovery on a real network (or in network namespaces).
//!
//! ```text
//! cargo run -p strata-discovery --example mdns -- advertise --name box1 --port 7070
//! cargo run -p strata-discovery --example mdns -- browse
//! ```
//!
//! `browse` prints one line per event (`resolved NAME ADDRESS STATE ALL_ADDRESSES` or
//! `removed NAME`);
//! `advertise` prints `advertising NAME` and withdraws the advertisement on Ctrl-C or
//! SIGTERM. `STRATA_LOG=mdns_sd=debug` shows the packets.

use clap::{Parser, Subcommand};
use strata_discovery::{
    Advertisement, Advertiser, AdvertiserOptions, Browser, BrowserOptions, ClusterTag, DeviceSummary, Event, NodeState,
    DEFAULT_CLUSTER,
};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = DEFAULT_CLUSTER)]
    cluster: String,
    /// Interfaces to use (default: all).
    #[arg(long = "interface")]
    interfaces: Vec<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Advertise {
        #[arg(long)]
        name: String,
        #[arg(long)]
        port: u16,
    },
    Browse,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("STRATA_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let cluster = ClusterTag::of(&args.cluster);
    match args.command {
        Command::Advertise { name, port } => {
            let advertisement = Advertisement {
                protocol_version: strata_proto::PROTOCOL_VERSION,
                node_id: format!("example-{name}"),
                grpc_port: port,
                devices: DeviceSummary { count: 1, names: vec!["cpu".into()], memory_bytes: 0 },
                memory_offered_bytes: 0,
                speed: 0,
                state: NodeState::Idle,
                cluster,
            };
            let options =
                AdvertiserOptions { instance: name.clone(), interfaces: args.interfaces, ..Default::default() };
            let advertiser = Advertiser::start(options, advertisement)?;
            println!("advertising {name}");
            strata_platform::stop::requested().await;
            advertiser.shutdown().await?;
        }
        Command::Browse => {
            let mut browser = Browser::start(BrowserOptions { cluster, interfaces: args.interfaces, ipv6: false })?;
            println!("browsing");
            loop {
                let event = tokio::select! {
                    e = browser.next() => e,
                    _ = tokio::signal::ctrl_c() => None,
                };
                let Some(event) = event else { break };
                let address = event.grpc_address().map(|a| a.to_string()).unwrap_or_default();
                match event {
                    Event::Resolved { instance, advertisement, addresses, .. } => {
                        let all: Vec<String> = addresses.iter().map(|a| a.to_string()).collect();
                        println!("resolved {instance} {address} {} {}", advertisement.state.as_str(), all.join(","))
                    }
                    Event::Removed { instance } => println!("removed {instance}"),
                }
            }
            browser.shutdown().await?;
        }
    }
    Ok(())
}
