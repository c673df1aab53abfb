-- dashboard_dead_letters --
-- Dead outbox rows, oldest first, with their order's state (what an operator may re-drive)
SELECT ob.id, ob.order_id, ob.step, ob.attempts, ob.last_error, ob.created_at,
       now() - ob.created_at AS age, o.state AS order_state
  FROM outbox ob
  JOIN orders o ON o.id = ob.order_id
 WHERE ob.status = 'dead'
 ORDER BY ob.id
 LIMIT %(limit)s;

-- dashboard_needs_attention --
-- Orders parked in needs_attention, longest waiting first, with the dead step that parked them
SELECT o.id AS order_id, o.user_id, o.total_cents, o.currency, o.updated_at,
       now() - o.updated_at AS in_state_for, d.id AS outbox_id, d.step, d.last_error
  FROM orders o
  LEFT JOIN LATERAL (
        SELECT id, step, last_error
          FROM outbox
         WHERE order_id = o.id AND status = 'dead'
         ORDER BY id DESC
         LIMIT 1) d ON true
 WHERE o.state = 'needs_attention'
 ORDER BY o.updated_at
 LIMIT %(limit)s;

-- dashboard_stuck_orders --
-- The first rows of reporting.stuck_orders (longest stuck first)
SELECT order_id, state, updated_at, in_state_for, timeout_minutes, pending_step, step_status,
       attempts, last_error
  FROM reporting.stuck_orders
 LIMIT %(limit)s;

-- dashboard_funnel --
-- The newest days of the funnel snapshot, with the time it was taken
SELECT day, placed, paid, shipped, confirmed, cancelled, as_of
  FROM reporting.funnel
 ORDER BY day DESC
 LIMIT %(days)s;

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

-- dashboard_order_outbox --
-- Every outbox row of one order, done ones included, in the order they were written
SELECT id, step, status, attempts, available_at, lease_owner, lease_until, last_error,
       idempotency_key, created_at, claimed_at, done_at
  FROM outbox
 WHERE order_id = %(order_id)s
 ORDER BY id;

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
