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
-- Give every product effectively unlimited stock (the products trigger records it as an adjust)
UPDATE products SET available = available + %(extra)s;

-- bench_analyze --
-- Statistics for the freshly loaded tables
ANALYZE;

-- bench_vacuum --
-- What autovacuum does for a system at rest: statistics and the visibility map (index-only scans)
VACUUM (ANALYZE);

-- bench_unsettled --
-- Orders not yet in a settled or operator-visible state (not counting the synthetic S… orders of --preload)
SELECT count(*) AS n FROM orders
 WHERE state NOT IN ('confirmed', 'returned', 'cancelled', 'needs_attention')
   AND id NOT LIKE 'S%%';

-- bench_saga_span --
-- Seconds from the first order's commit to the last confirmation (not counting the synthetic S… orders of --preload)
SELECT EXTRACT(EPOCH FROM (SELECT max(at) FROM order_history
                            WHERE to_state = 'confirmed' AND order_id NOT LIKE 'S%%')
                          - (SELECT min(created_at) FROM orders WHERE id NOT LIKE 'S%%')) AS seconds;

-- bench_saga_span_from_claim --
-- Seconds from the first claim to the last confirmation (orders placed before the workers started)
SELECT EXTRACT(EPOCH FROM (SELECT max(at) FROM order_history
                            WHERE to_state = 'confirmed' AND order_id NOT LIKE 'S%%')
                          - (SELECT min(claimed_at) FROM outbox WHERE order_id NOT LIKE 'S%%')) AS seconds;

-- bench_max_outbox_id --
-- The newest outbox row so far (pickup latency is measured on rows after it)
SELECT COALESCE(max(id), 0) AS id FROM outbox;

-- bench_pickup_latencies --
-- Outbox commit to first claim, in milliseconds, for rows after a mark
SELECT step, EXTRACT(EPOCH FROM (claimed_at - created_at)) * 1000 AS ms
  FROM outbox
 WHERE id > %(after_id)s AND claimed_at IS NOT NULL;

-- bench_xact_commits --
-- Transactions committed in this database so far (pg_stat_database)
SELECT xact_commit AS n FROM pg_stat_database WHERE datname = current_database();

-- bench_seed_orders --
-- Synthetic orders n0..n1 spread over the last 90 days: 80% confirmed, 10% declined, 5% refused parcel, 3% returned, 2% in flight
INSERT INTO orders (id, user_id, state, total_cents, currency, payment_method_id,
                    shipping_address, email, idempotency_key, created_at, updated_at)
SELECT 'S' || lpad(g::text, 25, '0'),
       md5(g::text)::uuid,
       CASE WHEN g %% 100 < 80 THEN 'confirmed'
            WHEN g %% 100 < 95 THEN 'cancelled'
            WHEN g %% 100 < 98 THEN 'returned'
            WHEN g %% 100 = 98 THEN 'reserved'
            ELSE 'shipped' END,
       1000 + (g %% 50) * 100,
       CASE WHEN g %% 7 = 0 THEN 'USD' ELSE 'EUR' END,
       'pm_card_visa',
       '{"name": "Seed", "line1": "1 Seed St", "city": "Paris", "postal_code": "75001", "country": "FR"}',
       NULL,
       'seed-' || g,
       -- settled orders spread over 90 days; those still in flight are recent, and
       -- one in a hundred of them is stuck (older than its state's timeout)
       CASE WHEN g %% 100 < 98 OR g %% 10000 < 100
            THEN now() - make_interval(secs => ((g * 7919) %% 7776000)::double precision + 3600)
            ELSE now() - make_interval(secs => (g %% 600)::double precision) END,
       CASE WHEN g %% 100 < 98 OR g %% 10000 < 100
            THEN now() - make_interval(secs => ((g * 7919) %% 7776000)::double precision + 3000)
            ELSE now() - make_interval(secs => (g %% 600)::double precision) END
  FROM generate_series(%(n0)s::bigint, %(n1)s::bigint) AS g;

-- bench_seed_history --
-- The history of the synthetic orders, each a real path of the machine
INSERT INTO order_history (order_id, from_state, to_state, event, detail, at)
SELECT o.id, p.from_state, p.to_state, p.event, p.detail,
       o.created_at + make_interval(secs => p.n * 40)
  FROM orders o
  CROSS JOIN LATERAL (
        SELECT * FROM (VALUES
            (0, NULL, 'reserved', 'place', '{}'::jsonb, true),
            (1, 'reserved', 'paid', 'payment_captured', '{"step": "charge_payment"}'::jsonb,
                o.state IN ('confirmed', 'returned', 'shipped')
                OR (o.state = 'cancelled' AND right(o.idempotency_key, 2)::int %% 100 >= 90)),
            (2, 'paid', 'shipped', 'shipment_created', '{"step": "ship_order"}'::jsonb,
                o.state IN ('confirmed', 'returned', 'shipped')),
            (3, 'shipped', 'confirmed', 'confirmation_sent', '{"step": "send_confirmation"}'::jsonb,
                o.state IN ('confirmed', 'returned')),
            (4, 'confirmed', 'return_requested', 'return_requested', '{}'::jsonb, o.state = 'returned'),
            (5, 'return_requested', 'awaiting_return', 'return_label_created', '{}'::jsonb, o.state = 'returned'),
            (6, 'awaiting_return', 'returned', 'return_received', '{}'::jsonb, o.state = 'returned'),
            (1, 'reserved', 'compensating', 'payment_failed', '{"step": "charge_payment"}'::jsonb,
                o.state = 'cancelled' AND right(o.idempotency_key, 2)::int %% 100 < 90),
            (2, 'paid', 'compensating', 'shipment_failed', '{"step": "ship_order"}'::jsonb,
                o.state = 'cancelled' AND right(o.idempotency_key, 2)::int %% 100 >= 90),
            (3, 'compensating', 'compensating', 'compensation_done', '{"step": "refund_payment"}'::jsonb,
                o.state = 'cancelled' AND right(o.idempotency_key, 2)::int %% 100 >= 90),
            (4, 'compensating', 'cancelled', 'compensation_done', '{"step": "release_inventory"}'::jsonb,
                o.state = 'cancelled')
        ) AS v(n, from_state, to_state, event, detail, keep)
        WHERE keep) AS p
 WHERE o.id LIKE 'S%%' AND o.id BETWEEN %(first_id)s AND %(last_id)s
 ORDER BY o.id, p.n;

-- bench_seed_payments --
-- Charges for the synthetic orders that were paid, refunds for those given back
INSERT INTO payments (order_id, kind, status, provider_ref, amount_cents, currency, idempotency_key)
SELECT o.id, k.kind, 'succeeded', 'seed_' || k.kind, o.total_cents, o.currency, o.id || ':' || k.kind
  FROM orders o
  CROSS JOIN LATERAL (
        SELECT 'charge' AS kind
        UNION ALL
        SELECT 'refund' WHERE o.state IN ('cancelled', 'returned')) AS k
 WHERE o.id LIKE 'S%%' AND o.id BETWEEN %(first_id)s AND %(last_id)s
   -- paid exactly when the seeded history has payment_captured
   AND (o.state IN ('confirmed', 'returned', 'shipped')
        OR (o.state = 'cancelled' AND right(o.idempotency_key, 2)::int %% 100 >= 90));

-- bench_seed_outbox --
-- Finished outbox rows for the synthetic orders (three per order), as a running system keeps
INSERT INTO outbox (order_id, step, idempotency_key, status, attempts, created_at, done_at, claimed_at)
SELECT o.id, s.step, o.id || ':' || s.step, 'done', 1, o.created_at, o.created_at, o.created_at
  FROM orders o
  CROSS JOIN (VALUES ('charge_payment'), ('ship_order'), ('send_confirmation')) AS s(step)
 WHERE o.id LIKE 'S%%' AND o.id BETWEEN %(first_id)s AND %(last_id)s;

-- bench_count_orders --
-- How many orders
SELECT count(*) AS n FROM orders;

-- bench_count_order_history --
-- How many history rows
SELECT count(*) AS n FROM order_history;

-- bench_count_payments --
-- How many payment rows
SELECT count(*) AS n FROM payments;

-- bench_count_outbox --
-- How many outbox rows
SELECT count(*) AS n FROM outbox;

-- bench_dispatch_ready --
-- Make every order's charge done and move it to paid with its ship_order row (setup for bench dispatch)
WITH charged AS (
    UPDATE outbox SET status = 'done', done_at = now()
     WHERE step = 'charge_payment' AND status = 'pending'
    RETURNING order_id
), paid AS (
    UPDATE orders o SET state = 'paid', updated_at = now()
      FROM charged c WHERE o.id = c.order_id AND o.state = 'reserved'
    RETURNING o.id
), history AS (
    INSERT INTO order_history (order_id, from_state, to_state, event, detail)
    SELECT id, 'reserved', 'paid', 'payment_captured',
           jsonb_build_object('step', 'charge_payment', 'payment_intent_id', 'pi_bench_' || id)
      FROM paid
)
INSERT INTO outbox (order_id, step, idempotency_key, available_at)
SELECT id, 'ship_order', id || ':ship_order', now() + interval '1 hour' FROM paid;

-- bench_dispatch_release --
-- Make every seeded ship_order row ready at once, and the backlog (if any) ready and due before them, in its order (the clock starts here)
UPDATE outbox
   SET available_at = CASE WHEN order_id LIKE 'K%%' THEN available_at - interval '3 hours'
                           ELSE now() END
 WHERE status = 'pending' AND (step = 'ship_order' OR order_id LIKE 'K%%');

-- bench_seed_dead_letters --
-- Park the n first synthetic confirmed orders in needs_attention, each with a dead send_confirmation row
WITH picked AS (
    SELECT id FROM orders WHERE state = 'confirmed' AND id LIKE 'S%%' ORDER BY id LIMIT %(n)s
), parked AS (
    UPDATE orders o SET state = 'needs_attention', updated_at = now()
      FROM picked WHERE o.id = picked.id
 RETURNING o.id
)
UPDATE outbox ob
   SET status = 'dead', done_at = NULL, last_error = 'bench: HTTP 500 from the e-mail provider'
  FROM parked
 WHERE ob.order_id = parked.id AND ob.step = 'send_confirmation';

-- bench_sample_order --
-- One synthetic order in the middle of the history: what the dashboard bench searches for
SELECT id, user_id, idempotency_key
  FROM orders
 WHERE id LIKE 'S%%'
 ORDER BY id
 LIMIT 1 OFFSET %(offset)s;

-- bench_seed_backlog --
-- A backlog of n orders for bench dispatch: half paid with a ship_order row, half shipped with a send_confirmation row (the drain's own mix), held until bench_dispatch_release makes it due before the measured rows
WITH made AS (
    INSERT INTO orders (id, user_id, state, total_cents, currency, payment_method_id,
                        shipping_address, idempotency_key)
    SELECT 'K' || lpad(g::text, 25, '0'), gen_random_uuid(),
           CASE WHEN g %% 2 = 0 THEN 'paid' ELSE 'shipped' END, 500, 'EUR', 'pm_card_visa',
           '{"name": "B", "line1": "1 Bench St", "city": "Berlin", "postal_code": "10115", "country": "DE"}',
           'backlog-' || g
      FROM generate_series(1, %(n)s) g
    RETURNING id, state
)
INSERT INTO outbox (order_id, step, idempotency_key, available_at)
SELECT id, s.step, id || ':' || s.step,
       now() + interval '1 hour' + (substr(id, 2)::bigint * interval '1 millisecond')
  FROM made
  CROSS JOIN LATERAL (SELECT CASE WHEN made.state = 'paid' THEN 'ship_order'
                                  ELSE 'send_confirmation' END AS step) s;

-- bench_dispatch_window --
-- Seconds from the first claim to the n-th finish, for outbox rows after a mark (NULL until n are done)
SELECT count(*) AS rows,
       EXTRACT(EPOCH FROM (SELECT done_at FROM outbox
                            WHERE id > %(after_id)s AND status = 'done'
                            ORDER BY done_at OFFSET %(n)s - 1 LIMIT 1)
                          - min(claimed_at)) AS seconds
  FROM outbox
 WHERE id > %(after_id)s AND status = 'done';

-- bench_saga_hold --
-- Keep the placed orders' first rows from the workers while they start (bench saga --backlog-first)
WITH held AS (
    UPDATE outbox SET available_at = now() + interval '1 hour'
     WHERE step = 'charge_payment' AND status = 'pending'
    RETURNING id
)
SELECT count(*) AS n FROM held;

-- bench_saga_release --
-- Make every held first row ready at once and wake the workers (the clock starts here)
WITH released AS (
    UPDATE outbox SET available_at = now()
     WHERE step = 'charge_payment' AND status = 'pending'
    RETURNING id
)
SELECT count(*) AS n, pg_notify('orderflow_outbox', '') AS notified FROM released;

-- bench_statements_reset --
-- Start counting statements afresh (pg_stat_statements, where the server preloads it)
SELECT pg_stat_statements_reset() IS NOT NULL AS reset;

-- bench_statements_total --
-- Statements executed in this database since the reset (BEGIN and COMMIT included)
SELECT COALESCE(sum(calls), 0)::bigint AS calls,
       COALESCE(sum(calls) FILTER (WHERE query IN ('BEGIN', 'COMMIT')), 0)::bigint AS transaction_controls
  FROM pg_stat_statements
 WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database());

-- bench_statements_top --
-- The statements that took the most server time since the reset
SELECT left(regexp_replace(query, '\s+', ' ', 'g'), 90) AS query, calls,
       round(total_exec_time::numeric, 1) AS total_ms, round(mean_exec_time::numeric, 3) AS mean_ms
  FROM pg_stat_statements
 WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
 ORDER BY total_exec_time DESC
 LIMIT %(n)s;

-- bench_first_claims --
-- When each order's first row (charge_payment) was first claimed, as epoch seconds
SELECT order_id, EXTRACT(EPOCH FROM claimed_at) AS claimed_epoch
  FROM outbox
 WHERE step = 'charge_payment' AND order_id = ANY(%(ids)s) AND claimed_at IS NOT NULL;

-- bench_events_count --
-- Order events in the table (the seeded history's, written by its trigger)
SELECT count(*) AS n FROM order_events;

-- bench_events_orders --
-- Every order's id, each to get more history rows in the latency phase
SELECT id FROM orders ORDER BY id;

-- bench_events_note --
-- A self-loop history row on each of these orders: their events come from the history trigger
INSERT INTO order_history (order_id, from_state, to_state, event)
SELECT id, state, state, 'bench_note' FROM orders WHERE id = ANY(%(order_ids)s);

-- bench_events_last_sequences --
-- These orders' newest event sequence numbers (the ones the note just wrote)
SELECT order_id, max(sequence) AS sequence
  FROM order_events
 WHERE order_id = ANY(%(order_ids)s)
 GROUP BY order_id;

-- bench_events_published --
-- Order events published by the relay, and those still waiting
SELECT count(*) FILTER (WHERE published_at IS NOT NULL) AS published,
       count(*) FILTER (WHERE published_at IS NULL) AS pending
  FROM order_events;

