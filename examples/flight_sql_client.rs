//! cargo run --release -p quiver-examples --example flight_sql_client -- [URL] [SERVICE]
//!
//! Flight SQL with arrow-flight's `FlightSqlServiceClient`: lists the tables, then runs a
//! prepared statement with one parameter bound and reads every endpoint of its
//! FlightInfo. URL defaults to $QUIVER_URL or http://127.0.0.1:50051. With
//! authentication, set QUIVER_USER and QUIVER_PASSWORD (a Basic handshake).

use std::sync::Arc;

use arrow::array::{RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::util::pretty::pretty_format_batches;
use arrow_flight::FlightInfo;
use arrow_flight::sql::CommandGetTables;
use arrow_flight::sql::client::FlightSqlServiceClient;
use futures::TryStreamExt;
use tonic::transport::Channel;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .or_else(|| std::env::var("QUIVER_URL").ok())
        .unwrap_or_else(|| "http://127.0.0.1:50051".into());
    let service = args.next().unwrap_or_else(|| "api".into());

    let channel = tonic::transport::Endpoint::from_shared(url)?
        .connect()
        .await?;
    let mut client = FlightSqlServiceClient::new(channel);
    if let (Ok(user), Ok(password)) = (
        std::env::var("QUIVER_USER"),
        std::env::var("QUIVER_PASSWORD"),
    ) {
        // Keeps the bearer token the server returns for every later call.
        client.handshake(&user, &password).await?;
    }

    let info = client
        .get_tables(CommandGetTables {
            include_schema: false,
            ..Default::default()
        })
        .await?;
    let tables = fetch(&mut client, info).await?;
    println!("{}", pretty_format_batches(&tables)?);

    let mut statement = client
        .prepare(
            "SELECT status, COUNT(*) AS requests FROM requests \
             WHERE service = $1 GROUP BY status ORDER BY status"
                .into(),
            None,
        )
        .await?;
    let params = Schema::new(vec![Field::new("$1", DataType::Utf8, false)]);
    statement.set_parameters(RecordBatch::try_new(
        Arc::new(params),
        vec![Arc::new(StringArray::from(vec![service]))],
    )?)?;
    let info = statement.execute().await?;
    let batches = fetch(&mut client, info).await?;
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    println!("{}", pretty_format_batches(&batches)?);
    println!("{rows} rows");
    statement.close().await?;
    Ok(())
}

/// Reads every endpoint of `info`, in order.
async fn fetch(
    client: &mut FlightSqlServiceClient<Channel>,
    info: FlightInfo,
) -> anyhow::Result<Vec<RecordBatch>> {
    let mut batches = Vec::new();
    for endpoint in info.endpoint {
        let ticket = endpoint
            .ticket
            .ok_or_else(|| anyhow::anyhow!("endpoint without a ticket"))?;
        let stream = client.do_get(ticket).await?;
        batches.extend(stream.try_collect::<Vec<_>>().await?);
    }
    Ok(batches)
}
