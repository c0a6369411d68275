//! cargo run --release -p quiver-examples --example flight_client -- [URL] ["SQL"]
//!
//! Runs one SQL statement against a Quiver server with arrow-flight's `FlightClient`:
//! the ticket is the SQL text, the result streams back as record batches, printed as a
//! table. URL defaults to $QUIVER_URL or http://127.0.0.1:50051 (`quiver serve --demo`).

use arrow::util::pretty::pretty_format_batches;
use arrow_flight::{FlightClient, Ticket};
use futures::TryStreamExt;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .or_else(|| std::env::var("QUIVER_URL").ok())
        .unwrap_or_else(|| "http://127.0.0.1:50051".into());
    let sql = args.next().unwrap_or_else(|| {
        "SELECT service, COUNT(*) AS requests FROM requests GROUP BY service ORDER BY service"
            .into()
    });

    let channel = tonic::transport::Endpoint::from_shared(url)?
        .connect()
        .await?;
    let mut client = FlightClient::new(channel);

    // Batches arrive as the server produces them; collect them here to print one table.
    let stream = client.do_get(Ticket::new(sql)).await?;
    let batches: Vec<_> = stream.try_collect().await?;
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    println!("{}", pretty_format_batches(&batches)?);
    println!("{rows} rows");
    Ok(())
}
