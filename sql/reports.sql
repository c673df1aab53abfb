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
