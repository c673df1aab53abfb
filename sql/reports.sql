-- report_order_states --
-- Orders per state with the oldest updated_at
SELECT * FROM reporting.order_states;

-- report_funnel --
-- Placed, paid, shipped, confirmed, cancelled per day
SELECT * FROM reporting.funnel;

-- report_state_durations --
-- Time spent per state, p50/p95/max
SELECT * FROM reporting.state_durations;

-- report_stuck_orders --
-- Orders past their state's timeout
SELECT * FROM reporting.stuck_orders;

-- report_outbox_backlog --
-- Outbox rows pending, in flight and dead per step
SELECT * FROM reporting.outbox_backlog;

-- report_compensations --
-- Cancellations by reason and failed step, refunds
SELECT * FROM reporting.compensations;

-- report_daily_sales --
-- Orders, gross, refunds and net per day and currency
SELECT * FROM reporting.daily_sales;

-- report_dead_letters --
-- Outbox rows that used up their attempts, with their order's state
SELECT * FROM reporting.dead_letters;

-- report_needs_attention --
-- Orders parked in needs_attention with the dead row that parked them
SELECT * FROM reporting.needs_attention;

-- report_payments --
-- Money held (capture at shipment), captured and refunded, per order state and currency
SELECT * FROM reporting.payments;

-- report_cancellations --
-- Undone orders by the reason that started it, with holds released and money refunded
SELECT * FROM reporting.cancellations;

-- report_holds --
-- Card payments held and not yet captured, soonest to expire first
SELECT * FROM reporting.holds;

-- report_event_backlog --
-- Order events not yet published to the broker, the oldest's age, and the last hour's relay lag
SELECT * FROM reporting.event_backlog;

-- metrics_orders_by_state --
-- Orders per state, for the metrics gauges
SELECT state, orders FROM reporting.order_states;

-- metrics_outbox --
-- Open and dead outbox rows per step and status with the oldest age, for the metrics gauges
SELECT step, status, count(*) AS n,
       EXTRACT(EPOCH FROM now() - min(created_at)) AS oldest_s
  FROM outbox
 WHERE status IN ('pending', 'in_flight', 'dead')
 GROUP BY step, status;

-- metrics_holds --
-- Card payments held and not captured yet, per currency: how many, how much, and the seconds left before the soonest must be captured (reporting.holds)
SELECT currency, count(*) AS n, sum(held_cents) AS held_cents,
       EXTRACT(EPOCH FROM min(time_left)) AS soonest_s
  FROM reporting.holds
 GROUP BY currency;

-- refresh_funnel --
-- Refresh the funnel snapshot without blocking its readers
REFRESH MATERIALIZED VIEW CONCURRENTLY reporting.funnel;

-- refresh_state_durations --
-- Refresh the state durations snapshot without blocking its readers
REFRESH MATERIALIZED VIEW CONCURRENTLY reporting.state_durations;

-- refresh_compensations --
-- Refresh the compensations snapshot without blocking its readers
REFRESH MATERIALIZED VIEW CONCURRENTLY reporting.compensations;

-- refresh_daily_sales --
-- Refresh the daily sales snapshot without blocking its readers
REFRESH MATERIALIZED VIEW CONCURRENTLY reporting.daily_sales;

-- record_refresh --
-- Remember when a snapshot was refreshed
INSERT INTO reporting.refreshes (view, refreshed_at, duration_ms)
VALUES (%(view)s, now(), %(duration_ms)s)
ON CONFLICT (view) DO UPDATE SET refreshed_at = excluded.refreshed_at, duration_ms = excluded.duration_ms;

-- snapshots_due --
-- Snapshots not refreshed within the interval
SELECT s.view
  FROM unnest(%(views)s::text[]) AS s(view)
  LEFT JOIN reporting.refreshes r ON r.view = s.view
 WHERE r.refreshed_at IS NULL OR r.refreshed_at < now() - make_interval(secs => %(interval_s)s);

-- refresh_lock --
-- One refresher at a time across workers (session advisory lock; false if taken)
SELECT pg_try_advisory_lock(hashtext('orderflow.report_refresh')) AS locked;

-- refresh_unlock --
-- Release the refresher lock
SELECT pg_advisory_unlock(hashtext('orderflow.report_refresh')) AS unlocked;

-- refresh_durations --
-- How long each snapshot's last refresh took
SELECT view, duration_ms, refreshed_at FROM reporting.refreshes ORDER BY view;

-- set_statement_timeout --
-- Set this session's statement timeout (the snapshots' refresh has its own); returns the one it replaces
SELECT current_setting('statement_timeout') AS previous,
       set_config('statement_timeout', %(value)s, false) AS now;
