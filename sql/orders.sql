-- reserve_stock --
-- Lock the caller's open cart if one is named, then take every line's quantity (the cart's and/or the given lines) from stock for the order about to be created, or none; SKUs locked in order
WITH cart AS (
    SELECT c.id, c.status, c.shipping_address, c.email
      FROM carts c
     WHERE c.id = %(cart_id)s AND c.user_id = %(user_id)s
       FOR UPDATE
), requested AS (
    SELECT l.sku, l.qty
      FROM cart_lines l JOIN cart ON cart.id = l.cart_id
     WHERE cart.status = 'open'
    UNION ALL
    SELECT w.sku, w.qty FROM unnest(%(skus)s::text[], %(qtys)s::int[]) AS w(sku, qty)
), wanted AS (
    SELECT sku, sum(qty)::int AS qty FROM requested GROUP BY sku
), locked AS (
    SELECT p.sku, p.available, p.price_cents, p.currency, wanted.qty
      FROM products p JOIN wanted USING (sku)
  ORDER BY p.sku
       FOR UPDATE OF p
), verdict AS (
    SELECT (SELECT count(*) FROM locked) = (SELECT count(*) FROM wanted)
           AND COALESCE(bool_and(available >= qty), false) AS ok
      FROM locked
), taken AS (
    -- the ledger row comes from the products trigger, named by ledger_note
    UPDATE products p
       SET available = p.available - locked.qty, updated_at = now(),
           ledger_note = 'reserve:' || %(order_id)s
      FROM locked, verdict
     WHERE p.sku = locked.sku AND verdict.ok
 RETURNING p.sku
)
SELECT (SELECT status FROM cart) AS cart_status,
       (SELECT shipping_address FROM cart) AS shipping_address,
       (SELECT email FROM cart) AS email,
       ARRAY(SELECT sku FROM wanted ORDER BY sku) AS wanted_skus,
       (SELECT ok FROM verdict) AS ok,
       (SELECT count(*) FROM taken) AS taken,
       COALESCE(
           (SELECT json_agg(json_build_object(
                        'sku', sku, 'qty', qty, 'available', available,
                        'price_cents', price_cents, 'currency', currency) ORDER BY sku)
              FROM locked),
           '[]'::json) AS lines;

-- insert_order --
-- Create an order in its first state with its lines, reservation, history and first outbox rows; mark its cart ordered (its stock ledger rows came with reserve_stock)
WITH new_order AS (
    INSERT INTO orders (id, user_id, cart_id, state, total_cents, currency, payment_method_id,
                        payment_mandate, shipping_address, email, idempotency_key)
    VALUES (%(order_id)s, %(user_id)s, %(cart_id)s, %(state)s, %(total_cents)s, %(currency)s,
            %(payment_method_id)s, %(payment_mandate)s, %(shipping_address)s, %(email)s,
            %(idempotency_key)s)
 RETURNING id, created_at
), lines AS (
    INSERT INTO order_lines (order_id, sku, qty, unit_price_cents)
    SELECT new_order.id, l.sku, l.qty, l.price
      FROM new_order,
           unnest(%(skus)s::text[], %(qtys)s::int[], %(prices)s::int[]) AS l(sku, qty, price)
), ordered_cart AS (
    UPDATE carts SET status = 'ordered', ordered_at = now()
     WHERE id = %(cart_id)s AND status = 'open'
 RETURNING id
), reservation AS (
    INSERT INTO reservations (order_id, expires_at, created_at)
    SELECT id, created_at + make_interval(secs => %(ttl_seconds)s), created_at FROM new_order
 RETURNING expires_at
), history AS (
    INSERT INTO order_history (order_id, from_state, to_state, event, detail)
    SELECT id, NULL, %(state)s, %(event)s, %(detail)s FROM new_order
), emitted AS (
    INSERT INTO outbox (order_id, step, idempotency_key)
    SELECT new_order.id, s.step, new_order.id || ':' || s.step
      FROM new_order CROSS JOIN unnest(%(steps)s::text[]) AS s(step)
 RETURNING id
)
SELECT new_order.id, new_order.created_at, reservation.expires_at,
       (SELECT count(*) FROM emitted) AS emitted,
       (SELECT count(*) FROM ordered_cart) AS cart_marked,
       (SELECT pg_notify('orderflow_outbox', '') WHERE EXISTS (SELECT 1 FROM emitted)) AS notified
  FROM new_order, reservation;

-- release_reservation --
-- Give a live reservation's stock back, once (guarded by released_at; the products trigger writes the ledger)
WITH released AS (
    UPDATE reservations
       SET released_at = now()
     WHERE order_id = %(order_id)s AND released_at IS NULL
 RETURNING order_id
)
UPDATE products p
   SET available = p.available + ol.qty, updated_at = now(),
       ledger_note = 'release:' || ol.order_id
  FROM order_lines ol JOIN released USING (order_id)
 WHERE p.sku = ol.sku
RETURNING p.sku, ol.qty AS delta;

-- order_history --
-- One order's history, oldest first
SELECT id, from_state, to_state, event, detail, at
  FROM order_history
 WHERE order_id = %(order_id)s
 ORDER BY id;

-- order_outbox --
-- One order's outbox rows, done ones included, oldest first, with their schedule and lease
SELECT id, step, status, attempts, available_at, lease_owner, lease_until, last_error,
       idempotency_key, created_at, claimed_at, done_at
  FROM outbox
 WHERE order_id = %(order_id)s
 ORDER BY id;

-- recent_orders --
-- The newest orders with their state, for the demo and operators
SELECT id, user_id, state, total_cents, currency, created_at, updated_at
  FROM orders
 ORDER BY id DESC
 LIMIT %(limit)s;

-- finish_pending_step --
-- Mark an order's pending outbox row for a step done (the demo's stand-in for the worker)
UPDATE outbox
   SET status = 'done', done_at = now()
 WHERE order_id = %(order_id)s AND step = %(step)s AND status = 'pending'
RETURNING id;

-- get_order --
-- One order's headline fields
SELECT id, user_id, state, total_cents, currency, created_at, updated_at
  FROM orders
 WHERE id = %(order_id)s;

-- consume_reservation --
-- Turn a live reservation into sold stock once payment is captured
UPDATE reservations
   SET consumed_at = now()
 WHERE order_id = %(order_id)s AND consumed_at IS NULL AND released_at IS NULL
RETURNING order_id;

-- restock_order --
-- Put a returned order's lines back on sale, once (a line already restocked is left alone; the ledger's unique key guards it too)
WITH lines AS (
    SELECT l.order_id, l.sku, l.qty
      FROM order_lines l
     WHERE l.order_id = %(order_id)s
       AND NOT EXISTS (SELECT 1 FROM stock_ledger s
                        WHERE s.order_id = l.order_id AND s.sku = l.sku AND s.kind = 'restock')
)
UPDATE products p
   SET available = p.available + lines.qty, updated_at = now(),
       ledger_note = 'restock:' || lines.order_id
  FROM lines
 WHERE p.sku = lines.sku
RETURNING p.sku, lines.qty AS delta;

-- get_order_for_user --
-- One of the caller's orders with lines, payment and shipment references and history
SELECT o.id, o.state, o.total_cents, o.currency, o.created_at, o.updated_at,
       r.expires_at AS reservation_expires_at,
       COALESCE(
           (SELECT json_agg(json_build_object(
                        'sku', l.sku, 'qty', l.qty, 'unit_price_cents', l.unit_price_cents)
                        ORDER BY l.sku)
              FROM order_lines l WHERE l.order_id = o.id),
           '[]'::json) AS lines,
       COALESCE(
           (SELECT json_build_object(
                       'payment_intent_id', pi.id, 'status', pi.status,
                       'amount_cents', pi.amount_cents,
                       'amount_received_cents', pi.amount_received_cents,
                       -- capture at shipment: the funds held, then captured
                       'funds', CASE pi.status
                                    WHEN 'requires_capture' THEN 'held'
                                    WHEN 'succeeded' THEN 'captured'
                                    WHEN 'canceled' THEN
                                        CASE WHEN pi.held_at IS NOT NULL THEN 'released'
                                             ELSE 'none' END
                                    ELSE 'none' END,
                       'held_cents', CASE WHEN pi.status = 'requires_capture'
                                          THEN pi.amount_capturable_cents ELSE 0 END,
                       'captured_cents', pi.amount_received_cents,
                       'capture_before', CASE WHEN pi.status = 'requires_capture'
                                              THEN pi.capture_before END,
                       -- only while the customer must act (3-D Secure), for Stripe.js
                       'client_secret', CASE WHEN o.state = 'awaiting_payment'
                                              AND pi.status = 'requires_action'
                                             THEN pi.client_secret END,
                       'next_action', CASE WHEN o.state = 'awaiting_payment'
                                            AND pi.status = 'requires_action'
                                           THEN pi.next_action END)
              FROM payment_intents pi WHERE pi.order_id = o.id),
           (SELECT json_build_object('payment_intent_id', p.provider_ref, 'status', p.status)
              FROM payments p
             WHERE p.order_id = o.id AND p.kind = 'charge'
             ORDER BY p.id DESC LIMIT 1)) AS payment,
       (SELECT json_build_object('refund_id', p.provider_ref, 'status', p.status,
                                 'amount_cents', p.amount_cents)
          FROM payments p
         WHERE p.order_id = o.id AND p.kind = 'refund'
         ORDER BY p.id DESC LIMIT 1) AS refund,
       (SELECT json_build_object('shipment_id', s.carrier_ref, 'status', s.status,
                                 'tracking_number', s.tracking_number, 'label_url', s.label_url)
          FROM shipments s
         WHERE s.order_id = o.id AND s.kind = 'outbound') AS shipment,
       COALESCE(
           (SELECT json_agg(json_build_object(
                        'from_state', h.from_state, 'to_state', h.to_state,
                        'event', h.event, 'at', h.at) ORDER BY h.id)
              FROM order_history h WHERE h.order_id = o.id),
           '[]'::json) AS history
  FROM orders o
  LEFT JOIN reservations r ON r.order_id = o.id
 WHERE o.id = %(order_id)s AND o.user_id = %(user_id)s;

-- list_orders_for_user --
-- The caller's orders, newest first, after a keyset cursor, optionally in one state
SELECT o.id, o.state, o.total_cents, o.currency, o.created_at, o.updated_at
  FROM orders o
 WHERE o.user_id = %(user_id)s
   AND (%(state)s::text IS NULL OR o.state = %(state)s::text)
   AND (%(after_created_at)s::timestamptz IS NULL
        OR (o.created_at, o.id) < (%(after_created_at)s::timestamptz, %(after_id)s::text))
 ORDER BY o.created_at DESC, o.id DESC
 LIMIT %(limit)s;

-- order_state_change --
-- An order's id and state (the answer of an operator's request)
SELECT id, state FROM orders WHERE id = %(order_id)s;

-- order_owner_state --
-- Whether the order is the caller's, and its state
SELECT id, state FROM orders WHERE id = %(order_id)s AND user_id = %(user_id)s;

-- order_states_of --
-- The states of some orders
SELECT id, state FROM orders WHERE id = ANY(%(ids)s::text[]);

-- lock_orders --
-- Lock a batch of orders, in id order so batches never deadlock (read their facts with order_facts afterwards: a statement that waited for a lock still reads with the snapshot it started with)
SELECT o.id
  FROM orders o
 WHERE o.id = ANY(%(order_ids)s)
 ORDER BY o.id
   FOR UPDATE OF o;

-- order_facts --
-- Each locked order's state, history, outbox steps and the effectful steps whose outcome is unknown (in flight, or an answer lost)
SELECT o.id, o.state,
       ARRAY(SELECT ob.step FROM outbox ob WHERE ob.order_id = o.id ORDER BY ob.id) AS steps,
       ARRAY(SELECT ob.step FROM outbox ob
              WHERE ob.order_id = o.id AND ob.step = ANY(%(effectful)s::text[])
                AND (ob.status = 'in_flight'
                     OR (ob.status = 'pending' AND ob.payload @> '{"unsettled": true}'))
              ORDER BY ob.id) AS unsettled,
       COALESCE(
           (SELECT json_agg(json_build_object(
                        'from_state', h.from_state, 'to_state', h.to_state,
                        'event', h.event, 'detail', h.detail) ORDER BY h.id)
              FROM order_history h
             WHERE h.order_id = o.id),
           '[]'::json) AS history
  FROM orders o
 WHERE o.id = ANY(%(order_ids)s)
 ORDER BY o.id;

-- transition_orders --
-- Move a batch of orders, each guarded by its old state; record their history and emitted outbox rows; one NOTIFY
WITH input AS (
    SELECT *
      FROM jsonb_to_recordset(%(moves)s)
           AS i(order_id text, from_state text, to_state text, event text, detail jsonb,
                steps jsonb)
), moved AS (
    UPDATE orders o
       SET state = i.to_state, updated_at = now()
      FROM input i
     WHERE o.id = i.order_id AND o.state = i.from_state
 RETURNING o.id
), history AS (
    INSERT INTO order_history (order_id, from_state, to_state, event, detail)
    SELECT i.order_id, i.from_state, i.to_state, i.event, i.detail
      FROM input i JOIN moved m ON m.id = i.order_id
), emitted AS (
    INSERT INTO outbox (order_id, step, idempotency_key)
    SELECT i.order_id, s.step, i.order_id || ':' || s.step
      FROM input i JOIN moved m ON m.id = i.order_id
     CROSS JOIN jsonb_array_elements_text(i.steps) AS s(step)
 RETURNING id
)
SELECT (SELECT count(*) FROM moved) AS moved,
       (SELECT count(*) FROM emitted) AS emitted,
       (SELECT pg_notify('orderflow_outbox', '') WHERE EXISTS (SELECT 1 FROM emitted)) AS notified;

-- demo_expire_reservation --
-- The demo's fast-forward: one order's reservation expires now (instead of in 15 minutes)
UPDATE reservations
   SET expires_at = created_at + interval '1 microsecond'
 WHERE order_id = %(order_id)s AND consumed_at IS NULL AND released_at IS NULL
RETURNING order_id;

-- return_requested_with_key --
-- Whether the order's return was requested with this idempotency key (a replay after the key's purge)
SELECT id FROM order_history
 WHERE order_id = %(order_id)s AND event = 'return_requested'
   AND detail ->> 'idempotency_key' = %(key)s
 LIMIT 1;
