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

-- bench_unsettled --
-- Orders not yet in a settled or operator-visible state
SELECT count(*) AS n FROM orders
 WHERE state NOT IN ('confirmed', 'returned', 'cancelled', 'needs_attention');

-- bench_saga_span --
-- Seconds from the first order's commit to the last confirmation
SELECT EXTRACT(EPOCH FROM (SELECT max(at) FROM order_history WHERE to_state = 'confirmed')
                          - (SELECT min(created_at) FROM orders)) AS seconds;

-- bench_max_outbox_id --
-- The newest outbox row so far (pickup latency is measured on rows after it)
SELECT COALESCE(max(id), 0) AS id FROM outbox;

-- bench_pickup_latencies --
-- Outbox commit to first claim, in milliseconds, for rows after a mark
SELECT EXTRACT(EPOCH FROM (claimed_at - created_at)) * 1000 AS ms
  FROM outbox
 WHERE id > %(after_id)s AND claimed_at IS NOT NULL;

-- bench_xact_commits --
-- Transactions committed in this database so far (pg_stat_database)
SELECT xact_commit AS n FROM pg_stat_database WHERE datname = current_database();
