CREATE OR REPLACE VIEW reporting.cancellations AS
WITH entered AS (
    SELECT DISTINCT ON (h.order_id) h.order_id, h.event AS reason
      FROM public.order_history h
     WHERE h.to_state = 'compensating'
     ORDER BY h.order_id, h.id
)
SELECT e.reason,
       count(*) AS orders,
       count(*) FILTER (WHERE o.state = 'cancelled') AS cancelled,
       count(*) FILTER (WHERE o.state = 'compensating') AS compensating,
       count(*) FILTER (WHERE o.state = 'needs_attention') AS needs_attention,
       count(*) FILTER (WHERE pi.held_at IS NOT NULL AND pi.status = 'canceled'
                          AND pi.amount_received_cents = 0) AS holds_released,
       COALESCE(sum(r.amount_cents), 0)::bigint AS refunded_cents
  FROM entered e
  JOIN public.orders o ON o.id = e.order_id
  LEFT JOIN public.payment_intents pi ON pi.order_id = e.order_id
  LEFT JOIN public.payments r
         ON r.order_id = e.order_id AND r.kind = 'refund' AND r.status = 'succeeded'
 GROUP BY e.reason
 ORDER BY orders DESC, e.reason;

COMMENT ON VIEW reporting.cancellations IS
  'Orders that were undone, by the reason that started it (customer_cancelled, operator_cancelled, payment_failed, reservation_expired, shipment_failed, capture_failed, hold_lost): how many ended cancelled, how many had their hold released (no money moved) and how much was refunded. Live, not a snapshot.';
