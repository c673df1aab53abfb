-- record_payment_intent --
-- Keep the order's PaymentIntent as last seen; one per order (another id for the same order changes nothing and returns no row)
INSERT INTO payment_intents AS pi (order_id, id, status, amount_cents, amount_received_cents,
                                   amount_capturable_cents, currency, client_secret, next_action,
                                   last_error_code, capture_before, held_at)
VALUES (%(order_id)s, %(id)s, %(status)s, %(amount_cents)s, %(amount_received_cents)s,
        %(amount_capturable_cents)s, %(currency)s, %(client_secret)s, %(next_action)s,
        %(last_error_code)s, to_timestamp(%(capture_before)s::bigint),
        CASE WHEN %(status)s = 'requires_capture' THEN now() END)
ON CONFLICT (order_id) DO UPDATE
   SET status = EXCLUDED.status,
       amount_received_cents = EXCLUDED.amount_received_cents,
       amount_capturable_cents = EXCLUDED.amount_capturable_cents,
       client_secret = COALESCE(EXCLUDED.client_secret, pi.client_secret),
       next_action = EXCLUDED.next_action,
       last_error_code = EXCLUDED.last_error_code,
       capture_before = COALESCE(EXCLUDED.capture_before, pi.capture_before),
       held_at = COALESCE(pi.held_at, EXCLUDED.held_at),
       updated_at = now()
 WHERE pi.id = EXCLUDED.id
RETURNING order_id;

-- order_payment_intent --
-- The order a PaymentIntent belongs to, with the order's state
SELECT pi.order_id, pi.id, pi.status, o.state
  FROM payment_intents pi JOIN orders o ON o.id = pi.order_id
 WHERE pi.id = %(intent_id)s;

-- record_refund --
-- Record a refund's status: a pending row becomes succeeded or failed; a new refund gets its row (one succeeded refund per order)
WITH updated AS (
    UPDATE payments
       SET status = %(status)s, amount_cents = %(amount_cents)s, failure_code = %(failure_code)s
     WHERE order_id = %(order_id)s AND kind = 'refund' AND provider_ref = %(provider_ref)s
       AND status = 'pending'
 RETURNING id
)
INSERT INTO payments (order_id, kind, status, provider_ref, amount_cents, currency,
                      idempotency_key, failure_code)
SELECT %(order_id)s, 'refund', %(status)s, %(provider_ref)s, %(amount_cents)s, %(currency)s,
       %(idempotency_key)s, %(failure_code)s
 WHERE NOT EXISTS (SELECT 1 FROM updated)
   AND NOT EXISTS (SELECT 1 FROM payments
                    WHERE order_id = %(order_id)s AND kind = 'refund'
                      AND provider_ref = %(provider_ref)s AND status = %(status)s)
ON CONFLICT (order_id, kind) WHERE status = 'succeeded' DO NOTHING;

-- extend_reservation --
-- A bank debit is processing: hold the order's live reservation at least this much longer
UPDATE reservations
   SET expires_at = GREATEST(expires_at, now() + make_interval(secs => %(seconds)s))
 WHERE order_id = %(order_id)s AND consumed_at IS NULL AND released_at IS NULL
RETURNING expires_at;

-- nudge_outbox_rows --
-- Make an order's pending rows of some steps due now (a webhook says their provider has news)
UPDATE outbox
   SET available_at = now()
 WHERE order_id = %(order_id)s AND step = ANY(%(steps)s::text[]) AND status = 'pending'
RETURNING id;

-- insert_stripe_event --
-- Store a webhook event once (the inbox); a redelivery inserts nothing and returns no row
INSERT INTO stripe_events (id, type, object_id, order_id, stripe_created, outcome, data)
VALUES (%(id)s, %(type)s, %(object_id)s, %(order_id)s, to_timestamp(%(created)s), 'received',
        %(data)s)
ON CONFLICT (id) DO NOTHING
RETURNING id;

-- finish_stripe_event --
-- Record what a webhook event did (an event applied, or why it was ignored), and its order if we have it
UPDATE stripe_events
   SET outcome = %(outcome)s,
       order_id = (SELECT id FROM orders WHERE id = %(order_id)s)
 WHERE id = %(id)s;

-- order_exists --
-- Whether an order exists, with its state
SELECT id, state FROM orders WHERE id = %(order_id)s;

-- order_money --
-- An order's total and currency
SELECT id, state, total_cents, currency FROM orders WHERE id = %(order_id)s;

-- reconcile_orders --
-- Orders (with their recorded PaymentIntent, if any) and what our tables say of their money (for orderflow reconcile and the doctor)
SELECT o.id AS order_id, o.state, o.total_cents, o.currency, pi.id AS intent_id,
       pi.status AS intent_status,
       COALESCE((SELECT sum(p.amount_cents) FROM payments p
                  WHERE p.order_id = o.id AND p.kind = 'charge' AND p.status = 'succeeded'), 0)
           AS captured_cents,
       COALESCE((SELECT sum(p.amount_cents) FROM payments p
                  WHERE p.order_id = o.id AND p.kind = 'refund' AND p.status = 'succeeded'), 0)
           AS refunded_cents,
       EXISTS (SELECT 1 FROM outbox ob
                WHERE ob.order_id = o.id
                  AND ob.step IN ('charge_payment', 'await_payment', 'refund_payment',
                                  'refund_return')
                  AND ob.status IN ('pending', 'in_flight')) AS payment_step_open
  FROM orders o
  LEFT JOIN payment_intents pi ON pi.order_id = o.id
 WHERE o.id = ANY(%(order_ids)s::text[]) OR pi.id = ANY(%(intent_ids)s::text[])
    OR (%(states)s::text[] IS NOT NULL AND pi.id IS NOT NULL
        AND o.state = ANY(%(states)s::text[]));
