"""Independent readers for the oracle (O5): prints the row counts pyarrow and DuckDB read."""
import glob
import os
import sys

import duckdb
import pyarrow.parquet as pq

root = sys.argv[1]
files = [f for f in glob.glob(os.path.join(root, "**", "*.parquet"), recursive=True)
         if "/_sluice/" not in f]
arrow_rows = sum(pq.read_table(f).num_rows for f in files)
if files:
    duck_rows = duckdb.sql(
        f"select count(*) from read_parquet({files!r}, hive_partitioning = true)").fetchall()[0][0]
else:
    duck_rows = 0
print(arrow_rows, duck_rows)
