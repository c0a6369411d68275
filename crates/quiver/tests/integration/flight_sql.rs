//! Flight SQL through arrow-flight's own `FlightSqlServiceClient`, on the same port as
//! plain tickets. Expected rows come from the parquet crate's reader over the same files.

use std::sync::Arc;

use arrow_flight::sql::client::FlightSqlServiceClient;
use arrow_flight::sql::{
    Any, CommandGetDbSchemas, CommandGetExportedKeys, CommandGetImportedKeys,
    CommandGetPrimaryKeys, CommandGetTables, CommandGetXdbcTypeInfo, ProstMessageExt, SqlInfo,
};
use arrow_flight::{
    CancelFlightInfoRequest, CancelStatus, FlightDescriptor, FlightInfo, IpcMessage, Ticket,
};
use datafusion::arrow::array::{Array, ArrayRef, AsArray, Int64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Int64Type, Schema};
use futures::TryStreamExt;
use prost::Message;
use quiver::flight::ticket::QueryTicket;
use tonic::Code;

use crate::common::{self, Fixture};

/// Every (id, name) row of `logs` the parquet reader sees where `keep(v, name)`.
fn oracle(fx: &Fixture, keep: impl Fn(i64, Option<&str>) -> bool) -> Vec<(i64, Option<String>)> {
    let mut rows = vec![];
    for batch in common::read_parquet_dir(&fx.dir.path().join("logs")) {
        let id = batch
            .column_by_name("id")
            .unwrap()
            .as_primitive::<Int64Type>();
        let v = batch
            .column_by_name("v")
            .unwrap()
            .as_primitive::<Int64Type>();
        let name = datafusion::arrow::compute::cast(
            batch.column_by_name("name").unwrap(),
            &DataType::Utf8,
        )
        .unwrap();
        let name = name.as_string::<i32>();
        for i in 0..batch.num_rows() {
            let n = name.is_valid(i).then(|| name.value(i));
            if keep(v.value(i), n) {
                rows.push((id.value(i), n.map(str::to_string)));
            }
        }
    }
    rows.sort();
    rows
}

fn id_name_rows(batches: &[RecordBatch]) -> Vec<(i64, Option<String>)> {
    let mut rows = vec![];
    for b in batches {
        let id = b.column(0).as_primitive::<Int64Type>();
        let name = b.column(1).as_string::<i32>();
        for i in 0..b.num_rows() {
            rows.push((
                id.value(i),
                name.is_valid(i).then(|| name.value(i).to_string()),
            ));
        }
    }
    rows.sort();
    rows
}

async fn fetch(
    client: &mut FlightSqlServiceClient<tonic::transport::Channel>,
    info: FlightInfo,
) -> Vec<RecordBatch> {
    let mut batches = vec![];
    for endpoint in info.endpoint {
        let stream = client.do_get(endpoint.ticket.unwrap()).await.unwrap();
        batches.extend(stream.try_collect::<Vec<_>>().await.unwrap());
    }
    batches
}

fn rows(batches: &[RecordBatch]) -> usize {
    batches.iter().map(RecordBatch::num_rows).sum()
}

fn code(e: &impl std::fmt::Display) -> String {
    e.to_string()
}

#[tokio::test]
async fn statements_and_the_three_ticket_forms_return_the_same_rows() {
    let fx = Fixture::start().await;
    let sql = "SELECT id, name FROM logs WHERE v >= 4";
    let expected = oracle(&fx, |v, _| v >= 4);
    assert_eq!(expected.len(), 8);

    // Flight SQL: CommandStatementQuery -> FlightInfo -> DoGet(TicketStatementQuery).
    let mut sql_client = FlightSqlServiceClient::new(fx.channel.clone());
    let info = sql_client.execute(sql.to_string(), None).await.unwrap();
    let schema = info.clone().try_decode_schema().unwrap();
    assert_eq!(
        schema.field(1).data_type(),
        &DataType::Utf8,
        "views expanded"
    );
    let ticket = info.endpoint[0].ticket.clone().unwrap();
    let any = Any::decode(ticket.ticket.clone()).unwrap();
    assert_eq!(
        any.type_url,
        "type.googleapis.com/arrow.flight.protocol.sql.TicketStatementQuery"
    );
    assert_eq!(id_name_rows(&fetch(&mut sql_client, info).await), expected);

    // A plain SQL ticket and a Quiver QueryTicket, on the same port.
    let plain = fx.query(sql).await.unwrap();
    assert_eq!(id_name_rows(&plain), expected);
    let quiver: Vec<RecordBatch> = fx
        .client()
        .do_get(Ticket::new(QueryTicket::new(sql).encode_any()))
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(id_name_rows(&quiver), expected);

    // An Any of some other protocol is refused, not run as SQL.
    let foreign = Any {
        type_url: "type.googleapis.com/acme.v1.Query".into(),
        value: b"\x0a\x08SELECT 1".to_vec().into(),
    };
    let status = fx
        .do_get_status(&foreign.encode_to_vec())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status}");
    assert!(status.message().contains("acme.v1.Query"), "{status}");

    // PollFlightInfo answers complete at once, for both protocols.
    let poll = fx
        .client()
        .poll_flight_info(FlightDescriptor::new_cmd(sql))
        .await
        .unwrap();
    assert!(poll.flight_descriptor.is_none(), "complete");
    assert_eq!(poll.progress, Some(1.0));
    let info = poll.info.unwrap();
    assert_eq!(id_name_rows(&fetch(&mut sql_client, info).await), expected);
    let statement = arrow_flight::sql::CommandStatementQuery {
        query: sql.into(),
        transaction_id: None,
    };
    let poll = fx
        .client()
        .poll_flight_info(FlightDescriptor::new_cmd(
            statement.as_any().encode_to_vec(),
        ))
        .await
        .unwrap();
    assert_eq!(
        id_name_rows(&fetch(&mut sql_client, poll.info.unwrap()).await),
        expected
    );

    // CancelFlightInfo reaches a Flight SQL statement's query, even before its DoGet.
    let info = sql_client.execute(sql.to_string(), None).await.unwrap();
    let result = fx
        .client()
        .cancel_flight_info(CancelFlightInfoRequest::new(info.clone()))
        .await
        .unwrap();
    assert_eq!(result.status, CancelStatus::Cancelled as i32);
    let ticket = info.endpoint[0].ticket.clone().unwrap();
    let voided = match sql_client.do_get(ticket).await {
        Ok(stream) => stream
            .try_collect::<Vec<_>>()
            .await
            .unwrap_err()
            .to_string(),
        Err(e) => e.to_string(),
    };
    assert!(voided.contains("before it was redeemed"), "{voided}");
    fx.stop().await;
}

#[tokio::test]
async fn prepared_statements_bind_cast_and_rebind_parameters() {
    let fx = Fixture::start().await;
    let mut client = FlightSqlServiceClient::new(fx.channel.clone());
    let mut statement = client
        .prepare(
            "SELECT id, name FROM logs WHERE v > ? AND (name = ? OR name IS NULL) ORDER BY id"
                .into(),
            None,
        )
        .await
        .unwrap();
    let params = statement.parameter_schema().unwrap().clone();
    assert_eq!(params.fields().len(), 2);
    assert_eq!(params.field(0).data_type(), &DataType::Int64);
    assert_eq!(params.field(1).data_type(), &DataType::Utf8);
    assert_eq!(
        statement.dataset_schema().unwrap().field(1).data_type(),
        &DataType::Utf8
    );

    // Executing before binding says what to do.
    let unbound = statement.execute().await.unwrap_err();
    assert!(code(&unbound).contains("bind them"), "{unbound}");

    // ADBC and most clients send int64 and utf8 whatever the column type; the server
    // casts. Here the first value comes as a string.
    let bind = |v: ArrayRef, name: &str| {
        RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("0", v.data_type().clone(), true),
                Field::new("1", DataType::Utf8, true),
            ])),
            vec![v, Arc::new(StringArray::from(vec![name]))],
        )
        .unwrap()
    };
    statement
        .set_parameters(bind(Arc::new(StringArray::from(vec!["3"])), "name-4"))
        .unwrap();
    let info = statement.execute().await.unwrap();
    let got = id_name_rows(&fetch(&mut client, info).await);
    assert_eq!(
        got,
        oracle(&fx, |v, n| v > 3 && (n == Some("name-4") || n.is_none()))
    );

    // Rebinding runs the same statement with new values.
    statement
        .set_parameters(bind(Arc::new(Int64Array::from(vec![7])), "name-9"))
        .unwrap();
    let info = statement.execute().await.unwrap();
    assert_eq!(
        id_name_rows(&fetch(&mut client, info).await),
        oracle(&fx, |v, n| v > 7 && (n == Some("name-9") || n.is_none()))
    );

    // A value that cannot become the parameter's type fails at bind time.
    statement
        .set_parameters(bind(Arc::new(StringArray::from(vec!["seven"])), "x"))
        .unwrap();
    let bad = statement.execute().await.unwrap_err();
    assert!(code(&bad).contains("parameter $1"), "{bad}");
    statement.close().await.unwrap();

    // `$n` placeholders work too.
    let mut dollar = client
        .prepare(
            "SELECT COUNT(*) FROM logs WHERE v BETWEEN $1 AND $2".into(),
            None,
        )
        .await
        .unwrap();
    dollar
        .set_parameters(
            RecordBatch::try_from_iter([
                ("a", Arc::new(Int64Array::from(vec![2])) as ArrayRef),
                ("b", Arc::new(Int64Array::from(vec![5])) as ArrayRef),
            ])
            .unwrap(),
        )
        .unwrap();
    let info = dollar.execute().await.unwrap();
    let count = fetch(&mut client, info).await;
    assert_eq!(
        count[0].column(0).as_primitive::<Int64Type>().value(0) as usize,
        oracle(&fx, |v, _| (2..=5).contains(&v)).len()
    );
    dollar.close().await.unwrap();
    fx.stop().await;
}

#[tokio::test]
async fn metadata_calls_describe_the_catalog() {
    let fx = Fixture::start().await;
    let mut client = FlightSqlServiceClient::new(fx.channel.clone());

    let info = client.get_catalogs().await.unwrap();
    let catalogs = fetch(&mut client, info).await;
    assert_eq!(
        catalogs[0].column(0).as_string::<i32>().value(0),
        "datafusion"
    );

    let info = client
        .get_db_schemas(CommandGetDbSchemas {
            catalog: Some("datafusion".into()),
            db_schema_filter_pattern: Some("pub%".into()),
        })
        .await
        .unwrap();
    let schemas = fetch(&mut client, info).await;
    assert_eq!(rows(&schemas), 1);
    assert_eq!(schemas[0].column(1).as_string::<i32>().value(0), "public");

    let info = client
        .get_tables(CommandGetTables {
            catalog: None,
            db_schema_filter_pattern: Some("public".into()),
            table_name_filter_pattern: Some("lo_s".into()),
            table_types: vec!["TABLE".into()],
            include_schema: true,
        })
        .await
        .unwrap();
    let tables = fetch(&mut client, info).await;
    assert_eq!(rows(&tables), 1);
    let table = &tables[0];
    assert_eq!(
        table
            .column_by_name("table_name")
            .unwrap()
            .as_string::<i32>()
            .value(0),
        "logs"
    );
    assert_eq!(
        table
            .column_by_name("table_type")
            .unwrap()
            .as_string::<i32>()
            .value(0),
        "TABLE"
    );
    let schema_bytes = table
        .column_by_name("table_schema")
        .unwrap()
        .as_binary::<i32>()
        .value(0);
    let schema = Schema::try_from(IpcMessage(schema_bytes.to_vec().into())).unwrap();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(names, ["id", "v", "name", "day", "service"]);
    assert_eq!(
        schema.field_with_name("day").unwrap().data_type(),
        &DataType::Date32
    );
    assert_eq!(
        schema.field_with_name("name").unwrap().data_type(),
        &DataType::Utf8
    );

    let info = client.get_table_types().await.unwrap();
    let types = fetch(&mut client, info).await;
    let types: Vec<&str> = types[0]
        .column(0)
        .as_string::<i32>()
        .iter()
        .flatten()
        .collect();
    assert_eq!(types, ["TABLE", "VIEW"]);

    let info = client
        .get_sql_info(vec![
            SqlInfo::FlightSqlServerName,
            SqlInfo::FlightSqlServerReadOnly,
        ])
        .await
        .unwrap();
    let infos = fetch(&mut client, info).await;
    assert_eq!(rows(&infos), 2);
    let text = datafusion::arrow::util::pretty::pretty_format_batches(&infos)
        .unwrap()
        .to_string();
    assert!(text.contains("Quiver") && text.contains("true"), "{text}");

    let info = client
        .get_xdbc_type_info(CommandGetXdbcTypeInfo { data_type: None })
        .await
        .unwrap();
    let types = fetch(&mut client, info).await;
    let names: Vec<&str> = types[0]
        .column(0)
        .as_string::<i32>()
        .iter()
        .flatten()
        .collect();
    for expected in [
        "BIGINT",
        "VARCHAR",
        "DATE",
        "TIMESTAMP",
        "DECIMAL",
        "DOUBLE",
    ] {
        assert!(names.contains(&expected), "{names:?}");
    }

    let table = |t: &str| {
        (
            Some("datafusion".to_string()),
            Some("public".to_string()),
            t.to_string(),
        )
    };
    let (catalog, db_schema, t) = table("logs");
    let info = client
        .get_primary_keys(CommandGetPrimaryKeys {
            catalog: catalog.clone(),
            db_schema: db_schema.clone(),
            table: t.clone(),
        })
        .await
        .unwrap();
    let keys = fetch(&mut client, info).await;
    assert_eq!(rows(&keys), 0);
    let info = client
        .get_exported_keys(CommandGetExportedKeys {
            catalog: catalog.clone(),
            db_schema: db_schema.clone(),
            table: t.clone(),
        })
        .await
        .unwrap();
    assert_eq!(rows(&fetch(&mut client, info).await), 0);
    let info = client
        .get_imported_keys(CommandGetImportedKeys {
            catalog,
            db_schema,
            table: t,
        })
        .await
        .unwrap();
    assert_eq!(rows(&fetch(&mut client, info).await), 0);
    fx.stop().await;
}

#[tokio::test]
async fn updates_and_transactions_are_refused_and_the_server_keeps_serving() {
    let fx = Fixture::start().await;
    let mut client = FlightSqlServiceClient::new(fx.channel.clone());
    let update = client
        .execute_update("INSERT INTO logs VALUES (1, 1, 'x')".into(), None)
        .await
        .unwrap_err();
    assert!(
        code(&update).contains("read-only") || code(&update).contains("not allowed"),
        "{update}"
    );
    assert!(
        code(&update).contains("InvalidArgument") || code(&update).contains("invalid"),
        "{update}"
    );

    let transaction = client.begin_transaction().await.unwrap_err();
    assert!(
        code(&transaction).contains("no transactions"),
        "{transaction}"
    );

    // Writes through a statement are refused by the read-only guard.
    let insert = client
        .execute("INSERT INTO logs VALUES (1, 1, 'x')".into(), None)
        .await
        .unwrap_err();
    assert!(code(&insert).contains("not allowed"), "{insert}");

    // A closed handle is reported as such.
    let statement = client.prepare("SELECT 1".into(), None).await.unwrap();
    let mut again = statement.clone();
    statement.close().await.unwrap();
    let gone = again.execute().await.unwrap_err();
    assert!(code(&gone).contains("no open prepared statement"), "{gone}");

    let info = client
        .execute("SELECT COUNT(*) FROM logs".into(), None)
        .await
        .unwrap();
    let count = fetch(&mut client, info).await;
    assert_eq!(count[0].column(0).as_primitive::<Int64Type>().value(0), 12);
    fx.stop().await;
}
