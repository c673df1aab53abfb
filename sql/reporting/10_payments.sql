CREATE OR REPLACE VIEW reporting.payments AS
SELECT o.state,
       o.currency,
       count(*) AS orders,
       count(*) FILTER (WHERE pi.status = 'requires_capture') AS held_orders,
       COALESCE(sum(pi.amount_capturable_cents)
                FILTER (WHERE pi.status = 'requires_capture'), 0)::bigint AS held_cents,
       count(*) FILTER (WHERE pi.status = 'succeeded') AS captured_orders,
       COALESCE(sum(pi.amount_received_cents)
                FILTER (WHERE pi.status = 'succeeded'), 0)::bigint AS captured_cents,
       COALESCE(sum(r.refunded_cents), 0)::bigint AS refunded_cents
  FROM public.orders o
  JOIN public.payment_intents pi ON pi.order_id = o.id
  LEFT JOIN LATERAL (
        SELECT sum(p.amount_cents) AS refunded_cents
          FROM public.payments p
         WHERE p.order_id = o.id AND p.kind = 'refund' AND p.status = 'succeeded') r ON true
 GROUP BY o.state, o.currency
 ORDER BY o.state, o.currency;

COMMENT ON VIEW reporting.payments IS
  'Money per order state and currency, as Stripe last reported each order''s PaymentIntent: held (authorized, not captured: capture at shipment), captured, and refunded.';
