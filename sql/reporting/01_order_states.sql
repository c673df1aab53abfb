CREATE OR REPLACE VIEW reporting.order_states AS
SELECT t.state,
       count(o.id) AS orders,
       min(o.updated_at) AS oldest_updated_at,
       now() - min(o.updated_at) AS oldest_age
  FROM reporting.state_timeouts t
  LEFT JOIN public.orders o ON o.state = t.state
 GROUP BY t.state, t.position
 ORDER BY t.position;

COMMENT ON VIEW reporting.order_states IS
  'Orders per state (every state of the machine, zero included), with the oldest updated_at in each: how long the longest-waiting order has sat there.';
