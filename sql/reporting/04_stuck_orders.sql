CREATE OR REPLACE VIEW reporting.stuck_orders AS
SELECT o.id AS order_id,
       o.state,
       o.updated_at,
       now() - o.updated_at AS in_state_for,
       t.timeout_minutes,
       ob.step AS pending_step,
       ob.status AS step_status,
       ob.attempts,
       ob.last_error
  FROM reporting.state_timeouts t
 CROSS JOIN LATERAL (
        -- a range scan of ix_orders_state_updated_at per working state (OFFSET 0 keeps
        -- the planner from flattening this into a scan of every order)
        SELECT o.id, o.state, o.updated_at
          FROM public.orders o
         WHERE o.state = t.state
           AND o.updated_at < now() - make_interval(mins => t.timeout_minutes)
        OFFSET 0) AS o
  LEFT JOIN LATERAL (
        SELECT step, status, attempts, last_error
          FROM public.outbox
         WHERE order_id = o.id AND status <> 'done'
         ORDER BY id DESC
         LIMIT 1) ob ON true
 WHERE t.timeout_minutes IS NOT NULL
 ORDER BY o.updated_at;

COMMENT ON VIEW reporting.stuck_orders IS
  'Orders that have sat in a working state longer than its timeout (reporting.state_timeouts: 30 minutes for reserved, from the seed; the others editable), with the step they wait on, its attempts and last error.';
