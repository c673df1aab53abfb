CREATE OR REPLACE VIEW reporting.order_states AS
SELECT t.state,
       s.orders,
       s.oldest_updated_at,
       now() - s.oldest_updated_at AS oldest_age
  FROM reporting.state_timeouts t
 CROSS JOIN LATERAL (
        -- one index-only range scan of ix_orders_state_updated_at per state
        SELECT count(*) AS orders, min(o.updated_at) AS oldest_updated_at
          FROM public.orders o
         WHERE o.state = t.state
        OFFSET 0) AS s
 ORDER BY t.position;

COMMENT ON VIEW reporting.order_states IS
  'Orders per state (every state of the machine, zero included), with the oldest updated_at in each: how long the longest-waiting order has sat there.';
