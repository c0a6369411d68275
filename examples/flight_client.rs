//! cargo run -p quiver-examples --example query -- "SELECT COUNT(*) FROM requests"
//!
//! Runs one SQL statement against a Quiver server (default grpc://127.0.0.1:50051, or
//! $QUIVER_URL) with arrow-flight's client and prints the result.

use arrow::util::pretty::pretty_format_batches;
use arrow_flight::{FlightClient, Ticket};
use futures::TryStreamExt;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let sql = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "SELECT service, COUNT(*) AS n FROM requests GROUP BY service".into());
    let url = std::env::var("QUIVER_URL").unwrap_or_else(|_| "http://127.0.0.1:50051".into());
    let channel = tonic::transport::Channel::from_shared(url)?
        .connect()
        .await?;
    let mut client = FlightClient::new(channel);
    let batches: Vec<_> = client.do_get(Ticket::new(sql)).await?.try_collect().await?;
    println!("{}", pretty_format_batches(&batches)?);
    Ok(())
}
