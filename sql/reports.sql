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
