-- bench_create_table --
-- The bare endpoint's table: one INSERT per request, the ceiling the API is compared with
CREATE TABLE IF NOT EXISTS bench_inserts (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    payload jsonb NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);

-- bench_insert --
-- The bare endpoint's one statement
INSERT INTO bench_inserts (payload) VALUES (%(payload)s) RETURNING id;

-- bench_restock --
-- Give every product effectively unlimited stock (recorded in the ledger)
WITH adjusted AS (
    UPDATE products SET available = available + %(extra)s RETURNING sku
)
INSERT INTO stock_ledger (sku, kind, delta) SELECT sku, 'adjust', %(extra)s FROM adjusted;

-- bench_analyze --
-- Statistics for the freshly loaded tables
ANALYZE;
