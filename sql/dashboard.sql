-- dashboard_snapshot --
-- First statement of the overview's transaction: one consistent, read-only snapshot for all its reads
SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY;

-- dashboard_dead_letters --
-- The first rows of reporting.dead_letters (oldest first)
SELECT outbox_id AS id, order_id, order_state, step, attempts, last_error, created_at,
       since_written
  FROM reporting.dead_letters
 LIMIT %(limit)s;

-- dashboard_needs_attention --
-- The first rows of reporting.needs_attention (longest waiting first)
SELECT order_id, user_id, total_cents, currency, updated_at, waiting_for AS in_state_for,
       outbox_id, step, last_error
  FROM reporting.needs_attention
 LIMIT %(limit)s;

-- dashboard_stuck_orders --
-- The first rows of reporting.stuck_orders (longest stuck first)
SELECT order_id, state, updated_at, in_state_for, timeout_minutes, pending_step, step_status,
       attempts, last_error
  FROM reporting.stuck_orders
 LIMIT %(limit)s;

-- dashboard_money --
-- Money held (capture at shipment) and captured, in all, per currency (reporting.payments)
SELECT currency,
       sum(held_orders)::bigint AS held_orders, sum(held_cents)::bigint AS held_cents,
       sum(captured_orders)::bigint AS captured_orders,
       sum(captured_cents)::bigint AS captured_cents,
       sum(refunded_cents)::bigint AS refunded_cents
  FROM reporting.payments
 GROUP BY currency
 ORDER BY currency;

-- dashboard_holds_near_expiry --
-- Holds that must be captured within the margin, soonest first (reporting.holds)
SELECT order_id, state, held_cents, currency, capture_before, time_left
  FROM reporting.holds
 WHERE time_left <= make_interval(secs => %(margin_s)s)
 LIMIT %(limit)s;

-- dashboard_cancellations --
-- Undone orders by reason (reporting.cancellations)
SELECT reason, orders, cancelled, holds_released, refunded_cents FROM reporting.cancellations;

-- dashboard_funnel --
-- The funnel snapshot's last n UTC days, days without orders included (as zeros), with the time it was taken
SELECT d.day::date AS day,
       COALESCE(f.placed, 0) AS placed, COALESCE(f.paid, 0) AS paid,
       COALESCE(f.shipped, 0) AS shipped, COALESCE(f.confirmed, 0) AS confirmed,
       COALESCE(f.cancelled, 0) AS cancelled,
       (SELECT max(as_of) FROM reporting.funnel) AS as_of
  FROM generate_series((now() AT TIME ZONE 'UTC')::date - (%(days)s - 1),
                       (now() AT TIME ZONE 'UTC')::date, interval '1 day') AS d(day)
  LEFT JOIN reporting.funnel f ON f.day = d.day::date
 ORDER BY d.day;

-- dashboard_find_orders --
-- Orders matching an order id, an idempotency key or (when the query is a UUID) a user id, newest first
SELECT id, user_id, state, total_cents, currency, idempotency_key, created_at, updated_at
  FROM orders
 WHERE id = %(q)s
    OR idempotency_key = %(q)s
    OR user_id = %(user_id)s
 ORDER BY created_at DESC
 LIMIT %(limit)s;

-- dashboard_order --
-- One order for operators: every column, its reservation and the idempotency key's record
SELECT o.id, o.user_id, o.cart_id, o.state, o.total_cents, o.currency, o.payment_method_id,
       o.shipping_address, o.email, o.idempotency_key, o.created_at, o.updated_at,
       r.expires_at AS reservation_expires_at, r.consumed_at AS reservation_consumed_at,
       r.released_at AS reservation_released_at,
       k.recovery_point AS key_recovery_point, k.response_status AS key_response_status,
       k.created_at AS key_created_at
  FROM orders o
  LEFT JOIN reservations r ON r.order_id = o.id
  LEFT JOIN idempotency_keys k ON k.user_id = o.user_id AND k.key = o.idempotency_key
 WHERE o.id = %(order_id)s;

-- dashboard_order_lines --
-- One order's lines
SELECT sku, qty, unit_price_cents
  FROM order_lines
 WHERE order_id = %(order_id)s
 ORDER BY sku;

-- dashboard_order_intent --
-- One order's PaymentIntent as Stripe last reported it: held (capture at shipment) or captured, and by when a hold must be captured
SELECT id, status, amount_cents, amount_capturable_cents, amount_received_cents, currency,
       held_at, capture_before, last_error_code, updated_at
  FROM payment_intents
 WHERE order_id = %(order_id)s;

-- dashboard_order_payments --
-- One order's payment records (charges and refunds) with the provider's references
SELECT kind, status, provider_ref, amount_cents, currency, idempotency_key, failure_code,
       created_at
  FROM payments
 WHERE order_id = %(order_id)s
 ORDER BY id;

-- dashboard_order_shipments --
-- One order's shipments (outbound and return) with the carrier's references
SELECT kind, status, carrier_ref, tracking_number, label_url, idempotency_key, created_at,
       cancelled_at
  FROM shipments
 WHERE order_id = %(order_id)s
 ORDER BY id;

-- dashboard_session_start --
-- A login: its session's row (every dashboard process checks it); expired ones are dropped meanwhile
WITH dropped AS (
    DELETE FROM dashboard_sessions WHERE expires_at < now() - interval '1 day'
)
INSERT INTO dashboard_sessions (id, expires_at)
VALUES (%(id)s, now() + make_interval(secs => %(ttl_s)s));

-- dashboard_session_live --
-- Whether a login's session still holds (not logged out, not expired)
SELECT id FROM dashboard_sessions
 WHERE id = %(id)s AND revoked_at IS NULL AND expires_at > now();

-- dashboard_session_end --
-- Logout: the session is revoked for every dashboard process
UPDATE dashboard_sessions SET revoked_at = now() WHERE id = %(id)s AND revoked_at IS NULL;
