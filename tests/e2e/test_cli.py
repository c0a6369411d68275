"""The command line: flags combine, the catalog file applies, `demo` writes a dataset, `--help` documents."""

import subprocess

import pyarrow as pa
import pyarrow.dataset as ds

from conftest import Server, quiver_binary


def test_table_and_catalog_flags_combine(dataset, tmp_path):
    catalog = tmp_path / "quiver.toml"
    catalog.write_text(
        f"""
[tables.logs]
path = "{dataset / 'requests'}"
[tables.logs.partitions]
day = "string"
"""
    )
    server = Server(["--table", f"svc={dataset / 'services' / 'services.parquet'}", "--catalog", str(catalog)], tmp_path)
    try:
        names = sorted(i.descriptor.path[0].decode() for i in server.client.list_flights())
        assert names == ["logs", "svc"]
        schema = server.query("SELECT day FROM logs LIMIT 1").schema
        assert schema.field("day").type == pa.string()
        n = server.query("SELECT COUNT(*) AS n FROM logs WHERE day = '2026-01-02'").column("n")[0].as_py()
        assert n == ds.dataset(dataset / "requests" / "day=2026-01-02", format="parquet").count_rows()
    finally:
        server.stop()


def test_bad_flags_fail_with_a_message(tmp_path):
    out = subprocess.run(
        [str(quiver_binary()), "serve", "--table", "no-equals-sign"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0
    assert "NAME=PATH" in out.stderr
    out = subprocess.run(
        [str(quiver_binary()), "serve", "--table", f"t={tmp_path}/missing"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0
    assert "missing" in out.stderr


def test_demo_writes_a_dataset_that_serves(tmp_path):
    out = tmp_path / "demo"
    subprocess.run([str(quiver_binary()), "demo", "--out", str(out), "--rows", "7000"], check=True, timeout=120)
    expected = ds.dataset(out / "requests", format="parquet", partitioning="hive").count_rows()
    assert expected > 6000
    server = Server(["--data-dir", str(out)], tmp_path)
    try:
        n = server.query("SELECT COUNT(*) AS n FROM requests").column("n")[0].as_py()
        assert n == expected
        joined = server.query(
            "SELECT s.team, COUNT(*) AS n FROM requests r JOIN services s USING (service) GROUP BY s.team"
        )
        assert sum(joined.column("n").to_pylist()) == expected
    finally:
        server.stop()


def test_help_documents_every_flag_with_its_environment_variable():
    text = subprocess.run([str(quiver_binary()), "serve", "--help"], capture_output=True, text=True, check=True).stdout
    for flag in [
        "--listen ",
        "--listen-addr-file",
        "--table",
        "--data-dir",
        "--catalog",
        "--refresh-interval",
        "--demo",
        "--datafusion-config",
        "--log-filter",
        "--max-decoding-message-size",
        "--cache-max-size",
        "--cache-block-size",
        "--store-max-retries",
        "--store-retry-timeout",
        "--store-request-timeout",
        "--store-connect-timeout",
    ]:
        assert flag in text, flag
    assert text.count("[env: QUIVER_") >= 10
    assert "[default: 10s]" in text and "[default: 127.0.0.1:50051]" in text


def test_datafusion_config_passes_through(dataset, tmp_path):
    server = Server(
        ["--data-dir", str(dataset), "--datafusion-config", "datafusion.execution.batch_size=100"], tmp_path
    )
    try:
        reader = server.client.do_get(__import__("pyarrow.flight").flight.Ticket(b"SELECT request_id FROM requests"))
        sizes = [chunk.data.num_rows for chunk in reader]
        assert sizes and max(sizes) <= 100
        setting = server.query(
            "SELECT value FROM information_schema.df_settings WHERE name = 'datafusion.execution.batch_size'"
        )
        assert setting.column("value")[0].as_py() == "100"
    finally:
        server.stop()
    out = subprocess.run(
        [str(quiver_binary()), "serve", "--data-dir", str(dataset), "--datafusion-config", "datafusion.no.such=1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "datafusion.no.such" in out.stderr
