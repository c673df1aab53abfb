DROP VIEW IF EXISTS reporting.compensations;

CREATE MATERIALIZED VIEW reporting.compensations AS
SELECT snapshot.*, now() AS as_of
  FROM (
    WITH entered AS (
        SELECT DISTINCT ON (h.order_id)
               h.order_id,
               h.event AS reason,
               COALESCE(h.detail ->> 'step',
                        CASE h.event WHEN 'reservation_expired' THEN 'reserve_inventory' END,
                        '-')
                   AS failed_step
          FROM public.order_history h
         WHERE h.to_state = 'compensating'
         ORDER BY h.order_id, h.id
    )
    SELECT e.reason,
           e.failed_step,
           count(*) AS orders,
           count(*) FILTER (WHERE o.state = 'cancelled') AS cancelled,
           count(*) FILTER (WHERE o.state = 'compensating') AS compensating,
           count(*) FILTER (WHERE o.state = 'needs_attention') AS needs_attention,
           COALESCE(sum(r.amount_cents), 0)::bigint AS refunded_cents
      FROM entered e
      JOIN public.orders o ON o.id = e.order_id
      LEFT JOIN public.payments r
             ON r.order_id = e.order_id AND r.kind = 'refund' AND r.status = 'succeeded'
     GROUP BY e.reason, e.failed_step
     ORDER BY orders DESC, e.reason
) AS snapshot
WITH DATA;

CREATE UNIQUE INDEX compensations_key ON reporting.compensations (reason, failed_step);

COMMENT ON MATERIALIZED VIEW reporting.compensations IS
  'Orders that entered compensation, by the event that sent them there and the step that failed: how many are cancelled, still compensating or in needs_attention, and the amount refunded to them. A snapshot: the worker refreshes it every ORDERFLOW_REPORT_REFRESH_S seconds (60); as_of says when.';
