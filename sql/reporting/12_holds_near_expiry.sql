CREATE OR REPLACE VIEW reporting.holds AS
SELECT o.id AS order_id,
       o.state,
       pi.id AS payment_intent_id,
       pi.amount_capturable_cents AS held_cents,
       o.currency,
       pi.held_at,
       d.capture_before,
       d.capture_before - now() AS time_left
  FROM public.payment_intents pi
  JOIN public.orders o ON o.id = pi.order_id
  -- Stripe's charge says when (capture_before); without it, a card hold placed
  -- online is documented to last about 7 days.
 CROSS JOIN LATERAL (
       SELECT COALESCE(pi.capture_before, pi.held_at + interval '7 days') AS capture_before) d
 WHERE pi.status = 'requires_capture'
 ORDER BY d.capture_before;

COMMENT ON VIEW reporting.holds IS
  'Card payments held and not yet captured (capture at shipment), soonest to expire first: the worker captures a shipped order''s hold or sends an unshipped order to needs_attention ORDERFLOW_HOLD_MARGIN_S (24 h) before capture_before.';
