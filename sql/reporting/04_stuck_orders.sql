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
  FROM public.orders o
  JOIN reporting.state_timeouts t ON t.state = o.state
  LEFT JOIN LATERAL (
        SELECT step, status, attempts, last_error
          FROM public.outbox
         WHERE order_id = o.id AND status IN ('pending', 'in_flight', 'dead')
         ORDER BY id DESC
         LIMIT 1) ob ON true
 WHERE t.timeout_minutes IS NOT NULL
   AND o.updated_at < now() - make_interval(mins => t.timeout_minutes)
 ORDER BY o.updated_at;

COMMENT ON VIEW reporting.stuck_orders IS
  'Orders that have sat in a working state longer than its timeout (reporting.state_timeouts: 30 minutes for reserved, from the seed; the others editable), with the step they wait on, its attempts and last error.';
